"""`moray quickstart` end to end (the README's main command), then `moray generate` on the
checkpoint it trained: a user's first five minutes, as subprocesses."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading

from actors.transport import free_port


def test_quickstart_trains_serves_answers_and_stops_on_ctrl_c(tmp_path):
    """As a user runs it: it serves until Ctrl-C, and Ctrl-C stops it (Ray Train's leftover
    SIGINT handler once swallowed it)."""
    port = free_port("127.0.0.1")
    with open(tmp_path / "stderr.log", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "quickstart", "--steps", "12",
                                 "--port", str(port), "--grpc-port", str(free_port("127.0.0.1"))],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=stderr, text=True)
        watchdog = threading.Timer(900, proc.kill)  # a hung start fails the test instead of the suite
        watchdog.start()
        try:
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("serving; press Ctrl-C to stop"):
                    break
            proc.send_signal(signal.SIGINT)
            rest, _ = proc.communicate(timeout=120)
        finally:
            watchdog.cancel()
            proc.kill()
    out = "".join(lines) + rest
    # "stopped" is its own line (Ray may still forward a worker's log lines after it)
    assert proc.returncode == 0 and "serving; press Ctrl-C" in out and "stopped" in rest.splitlines(), \
        (out + (tmp_path / "stderr.log").read_text())[-4000:]
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
