"""The engine stress test: 2000 requests from 16 threads, 5% bad in every way a request can be bad,
mixed in (tests/stress_engine.py). Every good one equals model.generate on it alone, every bad one fails
alone with its error, nothing hangs, and the process, which never calls Engine.close(), exits with 0."""

import subprocess
import sys
from pathlib import Path


def test_2000_requests_from_16_threads_with_5_percent_bad(make_ckpt):
    ckpt = make_ckpt("bert", "gpt2", layers=1)
    script = Path(__file__).parent / "stress_engine.py"
    p = subprocess.run([sys.executable, str(script), str(ckpt), "2000", "16"], capture_output=True, text=True,
                       timeout=900)
    assert "terminate called" not in p.stderr, p.stderr[-3000:]
    assert p.returncode == 0, p.stderr[-3000:]
    assert "STRESS OK 2000 requests (100 bad) from 16 threads" in p.stdout, p.stdout + p.stderr[-3000:]
