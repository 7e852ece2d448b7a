"""The benchmark harnesses still run. They drive the code's internals (the expert-parallel
exchange functions, the MoE layer's protocol), so a change there could break them unnoticed
until the next GPU session. Each runs its CPU functional mode, which checks its own results
against the plain single-process layer and exits non-zero when they differ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ep_layer_runs_on_gloo_and_agrees_with_one_process(tmp_path):
    out = tmp_path / "ep_layer.json"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "RAY_ADDRESS": "local"}  # its own Ray, not a test's
    proc = subprocess.run([sys.executable, "benchmarks/ep_layer.py", "--cpu", "--shape", "tiny", "--tokens", "64",
                           "--iters", "2", "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["tokens_per_device"] == 64 and row["rel_err"] <= 1e-5
    for timed in ("one_device_ms", "two_devices_ms", "no_overlap_ms", "moray_comm_ms", "local_permute_ms",
                  "raw_comm_ms"):
        assert row[timed] > 0, timed
