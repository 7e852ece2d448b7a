"""The OpenAI-compatible endpoint on loopback, served by a real Ray Serve application whose
model replica is a router with 2 expert shards. Every answer is checked against the
single-process model's generation for the same prompt and seed."""

from __future__ import annotations

import json
import threading
import time

import grpc
import openai
import pytest
import ray
import requests
import torch
from ray import serve

from actors.transport import free_port
from model.checkpoint import save_checkpoint
from model.generate import SamplingParams, generate
from model.tokenizer import Tokenizer
from serve import moray_pb2, moray_pb2_grpc
from serve.app import GRPC_SERVICER, build_app
from serve.openai_api import chat_prompt, ChatMessage
from tests.conftest import build_model, tiny_config
from tests.routing_ties import untied
from train.data import prepare_corpus



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    manifest = prepare_corpus(None, root / "corpus", vocab_size=2048, progress=False)
    cfg = tiny_config("tiny")
    model = build_model(cfg, seed=1234)
    ckpt = save_checkpoint(root / "ckpt", cfg, model.state_dict(), tokenizer_file=manifest.tokenizer_path)
    port, grpc_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    ray.init(address="local", num_cpus=6, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]})
    serve.run(build_app({"checkpoint": str(ckpt), "num_shards": 2}), name="moray", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "grpc": f"127.0.0.1:{grpc_port}", "model": model,
           "tok": Tokenizer.load(manifest.tokenizer_path)}
    serve.shutdown()
    ray.shutdown()


def expected_text(server, prompt_ids: list[int], params: SamplingParams) -> tuple[str, list[int]]:
    tok = server["tok"]
    out = untied(server["model"], lambda: generate(server["model"], [prompt_ids], [params])[0])
    out = [t for t in out if t != tok.eos_id]
    return tok.decode(out), out


def post(server, path: str, body: dict, **kw) -> requests.Response:
    return requests.post(server["url"] + path, json=body, timeout=120, **kw)


PROMPTS = ["def parse(", "import os\nclass Loader:", "# The quick brown fox"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_single_process(server, prompt):
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = server["tok"].encode(prompt)
    text, out = expected_text(server, ids, SamplingParams(max_new_tokens=12, stop_tokens=(server["tok"].eos_id,)))
    assert body["choices"][0]["text"] == text
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(out), "total_tokens": len(ids) + len(out)}
    assert body["object"] == "text_completion" and body["model"] == "tiny"


def test_token_id_prompt_and_seeded_sampling_with_n(server):
    ids = server["tok"].encode("for i in range(")
    body = {"model": "tiny", "prompt": ids, "max_tokens": 10, "temperature": 0.9, "top_p": 0.95, "seed": 7, "n": 2}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    for i, choice in enumerate(choices):
        params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, seed=7 + i,
                                stop_tokens=(server["tok"].eos_id,))
        assert choice["text"] == expected_text(server, ids, params)[0]
    assert post(server, "/v1/completions", body).json()["choices"] == choices  # same seed, same answer


def test_streaming_sends_the_same_text_as_server_sent_events(server):
    body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0}
    full = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    r = post(server, "/v1/completions", body | {"stream": True}, stream=True)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop") and len(chunks) > 2


def test_chat_completion_and_the_openai_client(server):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A loop, please."}]
    ids = server["tok"].encode(chat_prompt([ChatMessage(**m) for m in messages]))
    text, _ = expected_text(server, ids, SamplingParams(max_new_tokens=9, stop_tokens=(server["tok"].eos_id,)))
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused")
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=9, temperature=0)
    assert reply.choices[0].message.content == text and reply.choices[0].message.role == "assistant"
    completion = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert completion.usage.completion_tokens > 0
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=9, temperature=0, stream=True))
    assert streamed == text
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_stop_strings_cut_the_text(server):
    body = {"model": "tiny", "prompt": PROMPTS[2], "max_tokens": 16, "temperature": 0}
    full = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    stop = full[3:5]
    assert stop, "needs a few characters of output"
    cut = post(server, "/v1/completions", body | {"stop": [stop]}).json()["choices"][0]
    assert cut["text"] == full[: full.find(stop)] and cut["finish_reason"] == "stop"


@pytest.mark.parametrize("body, status, param", [
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ({"model": "tiny", "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x " * 400}, 400, "prompt"),
    ({"model": "tiny", "prompt": [1, 99999]}, 400, "prompt"),
    ({"model": "tiny"}, 400, "prompt"),
])
def test_bad_requests_get_openai_errors_and_serving_goes_on(server, body, status, param):
    r = post(server, "/v1/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
    ok = post(server, "/v1/completions", {"model": "tiny", "prompt": "ok", "max_tokens": 2})
    assert ok.status_code == 200


def test_malformed_json_is_a_400(server):
    r = requests.post(server["url"] + "/v1/completions", data="{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def model_stats() -> dict:
    return serve.get_deployment_handle("MoEModel", app_name="moray").stats.remote().result()


def test_concurrent_clients_share_decode_steps(server):
    prompts = [PROMPTS[i % 3] + " " * (i % 4) for i in range(8)]
    results: dict[int, str] = {}
    before = len(model_stats()["batch_sizes"])

    def client(i: int) -> None:
        r = post(server, "/v1/completions", {"model": "tiny", "prompt": prompts[i], "max_tokens": 16, "temperature": 0})
        results[i] = r.json()["choices"][0]["text"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, prompt in enumerate(prompts):
        ids = server["tok"].encode(prompt)
        params = SamplingParams(max_new_tokens=16, stop_tokens=(server["tok"].eos_id,))
        assert results[i] == expected_text(server, ids, params)[0]
    sizes = model_stats()["batch_sizes"][before:]
    print("batch sizes under load:", sizes)
    assert max(sizes) > 1


def test_a_client_that_disconnects_frees_its_slot(server):
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 200, "temperature": 0,
                                         "stream": True}, stream=True)
    lines = r.iter_lines()
    next(lines)
    r.close()
    deadline = time.time() + 30
    while time.time() < deadline and model_stats()["running"]:
        time.sleep(0.2)
    stats = model_stats()
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_grpc_unary_and_streaming_equal_single_process(server):
    stub = moray_pb2_grpc.MorayGenerateStub(grpc.insecure_channel(server["grpc"]))
    meta = (("application", "moray"),)
    prompt = PROMPTS[0]
    ids = server["tok"].encode(prompt)
    text, out = expected_text(server, ids, SamplingParams(max_new_tokens=10, stop_tokens=(server["tok"].eos_id,)))
    reply = stub.Generate(moray_pb2.GenerateRequest(prompt=prompt, max_tokens=10), metadata=meta, timeout=60)
    assert reply.text == text and reply.prompt_tokens == len(ids) and reply.completion_tokens == len(out)
    chunks = list(stub.GenerateStream(moray_pb2.GenerateRequest(prompt_ids=ids, max_tokens=10), metadata=meta,
                                      timeout=60))
    assert "".join(c.text for c in chunks) == text and chunks[-1].finish_reason in ("stop", "length")
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(moray_pb2.GenerateRequest(prompt=prompt, max_tokens=5000), metadata=meta, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context" in err.value.details()
