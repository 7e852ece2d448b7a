"""The benchmark harnesses still run. They drive the code's internals (the expert-parallel
exchange functions, the MoE layer's protocol, the training worker's step), so a change there
could break them unnoticed until the next GPU session. Each runs in its CPU mode; ep_layer's
checks its own results against the plain single-process layer and exits non-zero when they
differ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, args: list[str], tmp_path) -> dict:
    """Run a harness in a process of its own; its --json output."""
    out = tmp_path / "rows.json"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "RAY_ADDRESS": "local"}  # its own Ray, not a test's
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args, "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_ep_layer_runs_on_gloo_and_agrees_with_one_process(tmp_path):
    (row,) = _run("ep_layer.py", ["--cpu", "--shape", "tiny", "--tokens", "64", "--iters", "2"], tmp_path)["rows"]
    assert row["tokens_per_device"] == 64 and row["rel_err"] <= 1e-5
    for timed in ("one_device_ms", "two_devices_ms", "no_overlap_ms", "moray_comm_ms", "local_permute_ms",
                  "raw_comm_ms"):
        assert row[timed] > 0, timed


def test_train_step_profiles_the_workers_step(tmp_path):
    """The worker's own step, timed and profiled: every phase of it seen, and it trains."""
    (row,) = _run("train_step.py", ["--cpu", "--preset", "tiny", "--impl", "moray", "--micro-batch", "2",
                                    "--seq-len", "32", "--steps", "3", "--warmup", "1", "--profile-steps", "1",
                                    "--top", "3"], tmp_path)["rows"]
    assert row["tokens_per_step"] == 64 and row["step_ms"] > 0 and 0 < row["loss"] < 20
    assert all(ms > 0 for ms in row["phases"].values()), row["phases"]
    assert row["wall_ms"] >= sum(row["phases"].values()) * 0.99
