"""`moray quickstart` end to end (the README's main command), then `moray generate` on the
checkpoint it trained: a user's first five minutes, as subprocesses."""

from __future__ import annotations

import re
import subprocess
import sys

from actors.transport import free_port


def test_quickstart_trains_serves_and_answers(tmp_path):
    port = free_port("127.0.0.1")
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "quickstart", "--no-wait", "--steps", "12",
                           "--port", str(port), "--grpc-port", str(free_port("127.0.0.1"))],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert step in out
    assert f"OpenAI-compatible endpoint: http://127.0.0.1:{port}/v1" in out
    assert re.search(r"Ray dashboard: http://127\.0\.0\.1:\d+", out)
    assert re.search(r"moray dashboard: http://127\.0\.0\.1:\d+  \(admin token: \S+\)", out)
    completion = out.split("[4/4] asking for a completion", 1)[1]
    assert "def main(" in completion and len(completion.split("def main(", 1)[1].split("OpenAI-compatible")[0].strip()) > 0
    checkpoint = re.search(r"checkpoint: (\S+)", out).group(1)
    gen = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", checkpoint, "--prompt", "import ",
                          "--max-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0 and gen.stdout.startswith("import "), gen.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", str(tmp_path / "nope"), "--prompt", "x"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
