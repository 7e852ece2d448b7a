"""The admin dashboard on a live local cluster: a training job submitted through the dashboard
runs as a Ray job, a tiny model is served on Ray Serve with 2 expert shards, and headless
Chromium (Debian's package, driven by Playwright) looks at every page while they run.

Screenshots go to $MORAY_SCREENSHOTS (the README's copies in docs/dashboard/ come from a run
with MORAY_SCREENSHOTS=docs/dashboard), else to the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import requests
from ray import serve
from ray.cluster_utils import Cluster

from actors.transport import free_port
from cluster.dashboard import start_in_background
from model.checkpoint import save_checkpoint
from serve.app import build_app
from tests.conftest import build_model, tiny_config
from train.data import prepare_corpus

CHROMIUM = "/usr/bin/chromium"
TOKEN = "test-admin-token-0123456789"
pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium package")


def wait_for(what: str, check, timeout_s: float = 120, every_s: float = 1.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    manifest = prepare_corpus(None, root / "corpus", vocab_size=2048, progress=False)
    cfg = tiny_config("tiny")
    ckpt = save_checkpoint(root / "ckpt", cfg, build_model(cfg, seed=7).state_dict(),
                           tokenizer_file=manifest.tokenizer_path)
    # own dashboard and agent ports: other clusters on this host must not be found instead
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 8, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": free_port("127.0.0.1"), "dashboard_agent_listen_port": free_port("127.0.0.1")})
    context = ray.init(address=cluster.address)
    serve_port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
    serve.run(build_app({"checkpoint": str(ckpt), "num_shards": 2}), name="moray", route_prefix="/")
    # any measurable imbalance raises the overview's alert (the default threshold is 2.0)
    url, server = start_in_background(context, port=free_port("127.0.0.1"), runs_dir=root / "runs",
                                      data_dir=root / "corpus", token=TOKEN, imbalance_alert=1.0)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    job = {"preset": "tiny", "overrides": ["train.max_steps=300", "train.num_workers=1", "train.log_every=2",
                                           "train.checkpoint_every=1000"]}
    # the job API answers 503 until its node agent is up
    reply = wait_for("the job API", lambda: (r := requests.post(f"{url}/api/jobs", json=job, headers=auth,
                                                                 timeout=60)).status_code != 503 and r, 90, 2)
    assert reply.status_code == 200, reply.text
    yield {"url": url, "serve": f"http://127.0.0.1:{serve_port}", "address": cluster.address, "context": context, "job": reply.json()["id"], "auth": auth,
           "shots": Path(os.environ.get("MORAY_SCREENSHOTS") or root / "screenshots")}
    server.should_exit = True
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def page(live):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("dialog", lambda dialog: dialog.accept())  # the confirmations of actions
        yield page
        browser.close()
        assert not errors, f"JavaScript errors: {errors}"


def show(page, live, view: str) -> None:
    page.goto(f"{live['url']}/#{view}")
    page.wait_for_function(f"document.body.dataset.rendered === '{view}'", timeout=60_000)


def sign_in(page) -> None:
    """Type the admin token into the page's token field, as an operator does."""
    page.fill("#token", TOKEN)
    page.dispatch_event("#token", "change")


def shoot(page, live, name: str) -> None:
    live["shots"].mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(live["shots"] / f"{name}.png"), full_page=True)


def complete(live, prompt: str, max_tokens: int = 8) -> dict:
    r = requests.post(f"{live['serve']}/v1/completions", timeout=120,
                      json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


# ---- API: mutations need the token; malformed requests are 422 with a message ----------------


def experts(live) -> dict:
    return requests.get(f"{live['url']}/api/experts/moray", timeout=60).json()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}],
                         ids=["no-token", "wrong-token", "no-scheme"])
def test_a_mutation_without_the_token_is_401_and_changes_nothing(live, headers):
    jobs_before = requests.get(f"{live['url']}/api/jobs", timeout=60).json()["jobs"]
    placement_before = experts(live)["placement"]
    for path, body in [("/api/jobs", {"preset": "tiny"}), (f"/api/jobs/{live['job']}/stop", {}),
                       ("/api/experts/moray/rebalance", {}), ("/api/experts/moray/scale", {"shards": 1}),
                       ("/api/endpoints/moray/completion", {"prompt": "x"})]:
        r = requests.post(live["url"] + path, json=body, headers=headers, timeout=60)
        assert r.status_code == 401, (path, r.text)
        assert "admin token" in r.json()["detail"] and TOKEN not in r.text
    jobs_after = requests.get(f"{live['url']}/api/jobs", timeout=60).json()["jobs"]
    assert [j["id"] for j in jobs_after] == [j["id"] for j in jobs_before]  # none submitted
    assert all(j["status"] in ("PENDING", "RUNNING") for j in jobs_after)  # none stopped
    assert experts(live)["placement"] == placement_before


@pytest.mark.parametrize("path, body, message", [
    ("/api/experts/moray/scale", {"shards": 0}, "shards: Input should be greater than or equal to 1"),
    ("/api/experts/moray/scale", {}, "shards: Field required"),
    ("/api/experts/moray/drain", {"node_id": "not a node"}, "node_id: String should match pattern"),
    ("/api/jobs", {"preset": "tiny", "overrides": ["max steps 5"]}, "an override is key=value"),
    ("/api/jobs", {"preset": "tiny", "overrides": ["train.max_stepz=5"]}, "train.max_stepz"),
    ("/api/jobs", {"preset": "no-such-preset"}, "no-such-preset"),
    ("/api/endpoints/moray/completion", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
])
def test_a_malformed_request_is_422_with_a_clear_message(live, path, body, message):
    jobs_before = len(requests.get(f"{live['url']}/api/jobs", timeout=60).json()["jobs"])
    r = requests.post(live["url"] + path, json=body, headers=live["auth"], timeout=60)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]
    assert len(requests.get(f"{live['url']}/api/jobs", timeout=60).json()["jobs"]) == jobs_before


def test_unknown_things_are_404_with_what_was_not_found(live):
    r = requests.get(f"{live['url']}/api/experts/nope", timeout=60)
    assert r.status_code == 404 and "no Serve application 'nope'" in r.json()["error"]
    r = requests.post(f"{live['url']}/api/jobs/raysubmit_nope/stop", headers=live["auth"], timeout=60)
    assert r.status_code == 404 and "no job 'raysubmit_nope'" in r.json()["error"]


def test_protect_reads_puts_every_view_behind_the_token(live):
    url, server = start_in_background(live["context"], port=free_port("127.0.0.1"), token=TOKEN, protect_reads=True)
    try:
        assert requests.get(url + "/", timeout=30).status_code == 200  # the page itself holds no data
        for path in ("/api/overview", "/api/jobs", "/api/endpoints", "/api/experts/moray"):
            assert requests.get(url + path, timeout=60).status_code == 401, path
        assert requests.get(url + "/api/jobs", headers=live["auth"], timeout=60).status_code == 200
    finally:
        server.should_exit = True


# ---- pages in the browser ---------------------------------------------------------------------


def test_overview_shows_nodes_versions_and_alerts(page, live):
    show(page, live, "overview")
    assert page.text_content("#ray-version") == ray.__version__
    assert page.text_content("#moray-version") != "unknown"
    row = page.locator("tr.node-row").first
    assert "ALIVE" in row.text_content() and "(head)" in row.text_content()
    # CPU and memory use come from the node's Prometheus metrics
    page.wait_for_function("[...document.querySelectorAll('tr.node-row td')].some(td => /GiB \\/ [0-9.]+ GiB/.test(td.textContent))",
                           timeout=60_000)
    assert page.locator("#alerts").is_visible()
    shoot(page, live, "overview")


def test_jobs_page_follows_the_running_job_live(page, live):
    show(page, live, "jobs")
    row = page.locator(f"tr.job-row[data-job='{live['job']}']")
    assert row.is_visible()
    page.wait_for_function(f"document.querySelector('#job-detail[data-job=\"{live['job']}\"]') && "
                           "Number(document.querySelector('#job-step').textContent) >= 2", timeout=240_000)
    first = int(page.text_content("#job-step"))
    assert "RUNNING" in row.text_content()
    # the curves grow without reloading the page
    page.wait_for_function(f"Number(document.querySelector('#job-step').textContent) > {first}", timeout=120_000)
    assert int(page.get_attribute("#job-detail .charts", "data-points")) >= 2
    assert "step " in page.text_content("#job-logs")
    shoot(page, live, "jobs")


def test_submit_form_shows_why_a_job_was_refused(page, live):
    show(page, live, "jobs")
    sign_in(page)
    jobs_before = len(requests.get(f"{live['url']}/api/jobs", timeout=60).json()["jobs"])
    page.fill("#submit-job textarea[name=overrides]", "train.num_workers=1 train.max_stepz=5")
    page.click("#submit-job button")
    page.wait_for_function("!document.getElementById('flash').hidden", timeout=30_000)
    assert "train.max_stepz" in page.text_content("#flash")
    assert page.get_attribute("#flash", "class") == "error"
    assert len(requests.get(f"{live['url']}/api/jobs", timeout=60).json()["jobs"]) == jobs_before


def test_endpoints_page_shows_replicas_shards_traffic_and_sends_a_test_completion(page, live):
    for prompt in ("import os", "def main(", "class A:"):
        complete(live, prompt)
    show(page, live, "endpoints")
    model_row = page.locator("tr.deployment-row[data-deployment='MoEModel']")
    assert "HEALTHY" in model_row.text_content() and "RUNNING" in model_row.text_content()
    assert model_row.locator(".shard").count() == 2
    # requests/s and latency come from Serve's metrics, which reach Prometheus within seconds
    page.wait_for_function("(() => { const cells = document.querySelectorAll(\"tr[data-deployment='MoEModel'] td\");"
                           " return cells.length > 6 && cells[5].textContent.endsWith('ms'); })()", timeout=90_000)
    sign_in(page)
    page.fill("#test-completion input[name=prompt]", "def parse(")
    page.click("#test-completion button")
    page.wait_for_function("document.querySelector('#completion-out') && "
                           "document.querySelector('#completion-out').textContent.includes('tokens in')", timeout=120_000)
    expected = complete(live, "def parse(", max_tokens=16)["choices"][0]["text"]
    assert page.text_content("#completion-out").startswith("def parse(" + expected)
    shoot(page, live, "endpoints")


def test_experts_heatmap_updates_with_requests_and_rebalance_changes_the_placement(page, live):
    show(page, live, "experts")
    sign_in(page)
    before = int(page.get_attribute("#heatmap", "data-load-total"))
    heat_before = page.eval_on_selector("#heatmap", "c => c.toDataURL()")
    for prompt in ("for i in range(", "while True:", "print("):
        complete(live, prompt, max_tokens=12)
    page.wait_for_function(f"Number(document.querySelector('#heatmap').dataset.loadTotal) > {before}", timeout=30_000)
    assert page.eval_on_selector("#heatmap", "c => c.toDataURL()") != heat_before
    shown = json.loads(page.get_attribute("#placement", "data-placement"))
    assert shown == experts(live)["placement"]
    page.click("#rebalance")
    page.wait_for_function(f"document.querySelector('#placement').dataset.placement !== JSON.stringify({json.dumps(shown)})"
                           " && document.querySelector('tr.event-row')?.textContent.includes('rebalance')",
                           timeout=60_000)
    after = json.loads(page.get_attribute("#placement", "data-placement"))
    status = experts(live)
    assert after == status["placement"] != shown, (after, status["events"])
    shoot(page, live, "experts")


def test_scale_shards_from_the_page(page, live):
    show(page, live, "experts")
    sign_in(page)
    page.fill("#shard-count", "3")
    page.click("#scale")
    # the new shard shows up as soon as it serves; the event is written when the switch is complete
    page.wait_for_function("document.querySelector('#shards-alive').textContent === '3 / 3' && "
                           "document.querySelector('tr.event-row')?.textContent.includes('scale')", timeout=120_000)
    assert all(len(layer) == 3 for layer in experts(live)["placement"])
    assert len(json.loads(page.get_attribute("#placement", "data-placement"))[0]) == 3
    # the Endpoints page lists the new shard under its replica (it started outside the replica's group)
    show(page, live, "endpoints")
    assert page.locator("tr.deployment-row[data-deployment='MoEModel'] .shard").count() == 3


def test_overview_alerts_on_expert_imbalance(page, live):
    status = wait_for("routed load", lambda: (s := experts(live))["imbalance"] > 1.0 and s, 60)
    show(page, live, "overview")
    alert = page.locator("#alerts .alert.warning")
    assert alert.count() == 1 and f"expert load imbalance {status['imbalance']:.2f}" in alert.text_content()


def test_stop_job_from_the_page(page, live):
    show(page, live, "jobs")
    sign_in(page)
    page.click("#stop-job")
    page.wait_for_function(f"document.querySelector(\"tr.job-row[data-job='{live['job']}']\").textContent.includes('STOPPED')",
                           timeout=120_000)
    audit = requests.get(f"{live['url']}/api/overview", timeout=60).json()["audit"]
    assert any(a["action"] == "stop job" and a["target"] == live["job"] and a["outcome"] == "ok" for a in audit)


def test_moray_dashboard_command_prints_its_url_and_a_new_token_once(live, tmp_path):
    port = free_port("127.0.0.1")
    env = {k: v for k, v in os.environ.items() if k != "MORAY_DASHBOARD_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "dashboard", "--address", live["address"],
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=tmp_path)
    try:
        lines = []
        while not any(line.startswith("admin token") for line in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        token = lines[-1].rsplit(" ", 1)[1].strip()
        assert any(f"moray dashboard: http://127.0.0.1:{port}" in line for line in lines)
        url = f"http://127.0.0.1:{port}"
        page = wait_for("the dashboard", lambda: _get(url + "/"), 60)
        assert "moray dashboard" in page.text
        # the printed token opens the mutations (a malformed one: accepted, validated, nothing changed)
        r = requests.post(f"{url}/api/experts/moray/scale", json={"shards": 0},
                          headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 422, r.text
        assert requests.post(f"{url}/api/experts/moray/scale", json={"shards": 0}, timeout=30).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _get(url: str) -> requests.Response | None:
    try:
        return requests.get(url, timeout=10)
    except requests.ConnectionError:
        return None
