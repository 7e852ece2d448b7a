"""How fast the Experts page draws a DeepSeek-V3-shaped model (58 MoE layers x 256 experts).

The dashboard app is served on loopback with a synthetic experts status (placement over
`--shards` shards with `--replicated` hot experts copied to a second shard, Zipf-like load);
headless Chromium (Debian's package, through Playwright) opens the Experts page. Timed:

- **ready**: from navigation start to the placement grid and the heat map drawn (fetch, JSON
  parse, page build and both canvases): what an operator waits for;
- **draw**: the two canvases alone, per poll once the page is up (the live-update cost).

Baseline in the same run and browser: the same two grids as one DOM element per cell
(2 x 58 x 256 = 29,696 elements), timed to the first frame after they are laid out.

Run: python benchmarks/dashboard_render.py --layers 58 --experts 256 --shards 32 --runs 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from actors.transport import free_port
from cluster.dashboard.app import create_app
from cluster.dashboard.sources import ClusterView, Settings

CHROMIUM = "/usr/bin/chromium"


def synthetic_status(layers: int, experts: int, shards: int, replicated: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    placement, load = [], []
    for _ in range(layers):
        order = list(range(experts))
        rng.shuffle(order)
        per = [sorted(order[s::shards]) for s in range(shards)]
        for e in rng.sample(range(experts), replicated):  # hot experts copied to another shard
            other = rng.choice([s for s in range(shards) if e not in per[s]])
            per[other].append(e)
        placement.append(per)
        load.append([int(1000 / (1 + rng.random() * experts) ** 0.8 * rng.uniform(0.5, 1.5)) for _ in range(experts)])
    shard_load = [sum(load[l][e] for l in range(layers) for e in placement[l][s]) for s in range(shards)]
    mean = sum(shard_load) / shards
    return {"placement": placement, "load": load, "shard_load": shard_load, "imbalance": max(shard_load) / mean,
            "shards": [{"index": s, "node_id": f"{(s // 8 + 1) * 0x11111111:08x}{0:048x}", "alive": True,
                        "n_experts": sum(len(placement[l][s]) for l in range(layers))} for s in range(shards)],
            "events": [], "controller": {"enabled": False}}


class SyntheticView(ClusterView):
    """Everything the Experts page asks for, from memory; no cluster behind it."""

    def __init__(self, status: dict):
        super().__init__(Settings(ray_dashboard="http://127.0.0.1:1", runs_dir=Path(tempfile.gettempdir()),
                                  data_dir=Path(tempfile.gettempdir())))
        self.status = status

    def experts(self, app: str) -> dict:
        return self.status


DOM_BASELINE = """async () => {
  const st = await (await fetch('/api/experts/moray')).json();
  const t0 = performance.now();
  const root = document.getElementById('view');
  root.replaceChildren();
  const layers = st.load.length, n = st.load[0].length;
  const owner = st.placement.map(shards => { const o = new Array(n).fill(0); shards.forEach((es, s) => es.forEach(e => { o[e] = s; })); return o; });
  for (const grid of ['placement', 'heat']) {
    const box = document.createElement('div');
    box.style.display = 'grid';
    box.style.gridTemplateColumns = `repeat(${n}, 4px)`;
    for (let l = 0; l < layers; l++) {
      const max = Math.max(1, ...st.load[l]);
      for (let e = 0; e < n; e++) {
        const d = document.createElement('div');
        d.style.height = '6px';
        d.title = `layer ${l} expert ${e}`;
        d.style.background = grid === 'placement' ? Charts.shardColor(owner[l][e]) : `rgb(${Charts.heat(st.load[l][e] / max).join(',')})`;
        box.append(d);
      }
    }
    root.append(box);
  }
  void root.offsetHeight;
  await new Promise(r => requestAnimationFrame(() => r()));
  return {ms: performance.now() - t0, nodes: root.querySelectorAll('div').length};
}"""


def measure(url: str, runs: int, screenshot: str | None = None) -> dict:
    from playwright.sync_api import sync_playwright

    ready, draw, dom = [], [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        for _ in range(runs):
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}/#experts")
            page.wait_for_function("window.morayTimings.expertsReadyMs !== undefined", timeout=60_000)
            ready.append(page.evaluate("window.morayTimings.expertsReadyMs"))
            # the next poll redraws with fresh data: the live-update cost
            page.evaluate("window.morayTimings.expertsDrawMs = undefined")
            page.wait_for_function("window.morayTimings.expertsDrawMs !== undefined", timeout=60_000)
            draw.append(page.evaluate("window.morayTimings.expertsDrawMs"))
            if screenshot:
                page.screenshot(path=screenshot, full_page=True)
            page.close()
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}/api/session")  # same origin as the API, none of the app's own script
            page.set_content("<div id='view'></div>")
            page.add_script_tag(url=f"{url}/static/charts.js")
            result = page.evaluate(DOM_BASELINE)
            dom.append(result["ms"])
            nodes = result["nodes"]
            page.close()
        version = browser.version
        browser.close()
    med = statistics.median
    return {"ready_ms": med(ready), "draw_ms": med(draw), "dom_ms": med(dom), "dom_nodes": nodes,
            "chromium": version, "ready_all": ready, "draw_all": draw, "dom_all": dom}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--replicated", type=int, default=8, help="hot experts per layer copied to a second shard")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--screenshot", help="write the page as drawn to this PNG")
    args = parser.parse_args()

    status = synthetic_status(args.layers, args.experts, args.shards, args.replicated)
    port = free_port("127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(create_app(SyntheticView(status), token="unused"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    result = measure(f"http://127.0.0.1:{port}", args.runs, args.screenshot)
    server.should_exit = True
    payload_kb = len(json.dumps(status)) / 1024
    print(f"machine: {platform.node()} {platform.machine()}, Chromium {result['chromium']}, "
          f"date {datetime.date.today()}")
    print(f"{args.layers} x {args.experts} experts, {args.shards} shards, {args.replicated} replicated per layer, "
          f"status JSON {payload_kb:.0f} KiB, median of {args.runs} runs")
    print("| page ready (ms) | canvas redraw per poll (ms) | DOM-cell baseline (ms) | DOM elements | DOM / canvas redraw |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    print(f"| {result['ready_ms']:.0f} | {result['draw_ms']:.1f} | {result['dom_ms']:.0f} | {result['dom_nodes']:,} "
          f"| {result['dom_ms'] / result['draw_ms']:.0f}x |")
    print("all runs:", {k: [round(v, 1) for v in result[k]] for k in ("ready_all", "draw_all", "dom_all")})


if __name__ == "__main__":
    main()
