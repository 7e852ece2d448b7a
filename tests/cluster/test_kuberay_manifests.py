"""`manifests/kuberay/` validates strictly against the KubeRay ray.io/v1 CRDs kept beside the
repository (`../shared/kuberay/`), and says what a user relies on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
VALIDATOR = REPO.parent / "shared" / "tools" / "validate-kuberay"
MANIFESTS = sorted((REPO / "manifests" / "kuberay").glob("*.yaml"))


def validate(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(VALIDATOR), *map(str, paths)], capture_output=True, text=True)


def test_every_manifest_validates_strictly():
    assert {p.name for p in MANIFESTS} == {"rayjob.yaml", "raycluster.yaml", "rayservice.yaml"}
    result = validate(*MANIFESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_unknown_field_is_rejected(tmp_path):
    doc = yaml.safe_load((REPO / "manifests" / "kuberay" / "rayjob.yaml").read_text())
    doc["spec"]["shutdownAfterJobFinish"] = True  # misspelled
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = validate(bad)
    assert result.returncode == 1 and "shutdownAfterJobFinish" in result.stdout + result.stderr


def test_the_job_trains_on_gpu_workers_and_the_service_serves_moray():
    job = yaml.safe_load((REPO / "manifests" / "kuberay" / "rayjob.yaml").read_text())
    assert "python -m train" in job["spec"]["entrypoint"]
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    service = yaml.safe_load((REPO / "manifests" / "kuberay" / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config["applications"][0]["import_path"] == "serve.app:build_app"
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
