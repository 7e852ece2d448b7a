"""`moray train --address` submits a Ray job to a cluster started by `ray start --head` with
token authentication on, follows it to the end and prints the checkpoint path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

from actors.transport import free_port
from train.data import prepare_corpus



@pytest.fixture(scope="module")
def head(tmp_path_factory):
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    dashboard, gcs = free_port("127.0.0.1"), free_port("127.0.0.1")
    subprocess.run(["ray", "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
                    "--dashboard-host=127.0.0.1", "--num-cpus=4", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True)
    yield f"http://127.0.0.1:{dashboard}"
    subprocess.run(["ray", "stop", "--force"], capture_output=True)


def test_moray_train_submits_a_job_and_prints_the_checkpoint(head, tmp_path):
    corpus = tmp_path / "corpus"
    prepare_corpus(None, corpus, vocab_size=2048, progress=False)
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # the CLI finds the local token itself
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train", "tiny", "train.max_steps=4", "train.log_every=2",
         "train.checkpoint_every=4", f"train.data_dir={corpus}", f"train.storage_path={tmp_path / 'runs'}",
         "train.run_name=submitted", "--address", head],
        capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "submitted job raysubmit_" in out and "SUCCEEDED" in out
    checkpoint_line = next(line for line in out.splitlines() if line.startswith("model checkpoint:"))
    model_dir = checkpoint_line.split(":", 1)[1].strip()
    assert os.path.isfile(os.path.join(model_dir, "experts.safetensors"))


def test_a_wrong_token_is_refused(head):
    with pytest.raises(AuthenticationError):
        JobSubmissionClient(head, headers={"Authorization": "Bearer " + "0" * 64}).list_jobs()
