"""One command for a machine with a GPU and no network: GPU parity tests, kernel timings, the
attention tile sweep and the W1-W4 workloads, then rewrite benchmarks/RESULTS.md (device, versions, date, tables).

    python benchmarks/gpu_report.py                  # everything
    python benchmarks/gpu_report.py --parts tests kernels      # a subset of the sections
    python benchmarks/gpu_report.py --parts csrc     # W1 with the CUDA C++ kernels off and on
    python benchmarks/gpu_report.py --out DIR        # also copy RESULTS.md and logs to DIR
    python benchmarks/gpu_report.py --quick --budget 420 --out $OUT   # a lent machine's one run (below)

--quick fits a session's device time (15 minutes, start-up included, on the project's lent machines): the
GPU tests without the CPU-only serving, Ray, CLI and stress files; W1, W2 and the Rothe-size W1 for
encdec_fast-triton and transformers-sdpa only; the W1 step profile (kernels per step, replay time); the
kernel table; the Engine; csrc on/off. --budget is a
deadline in seconds for the whole run: each part runs under what is left of it (a part cut short says
so in its section), and a part that would start with under 30 s left is skipped.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
PARTS = ("tests", "kernels", "tiles", "workloads", "profile", "engine", "csrc")


QUICK = False  # --quick: the reduced selection described above
DEADLINE: float | None = None  # --budget: time.monotonic() at which every part must have ended
PART_END: float | None = None  # the current part's own deadline (--quick --budget: its share, below)
# --quick --budget: the most of the budget each part may take (what one leaves goes to the next)
QUICK_SHARES = {"tests": 0.3, "workloads": 0.3, "profile": 0.1, "kernels": 0.12, "engine": 0.12, "csrc": 0.15}


def sh(cmd: list[str], log: Path, env=None, timeout=3000) -> tuple[int, str]:
    print("$", " ".join(cmd), flush=True)
    end = min(t for t in (DEADLINE, PART_END) if t is not None) if (DEADLINE or PART_END) else None
    if end is not None:
        timeout = max(1.0, min(timeout, end - time.monotonic()))
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})},
                           timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

        rc, out = 124, text(e.stdout) + text(e.stderr) + f"\n(cut short: the run's budget ended after {timeout:.0f} s)\n"
    log.write_text(out)
    print(out[-3000:], flush=True)
    return rc, out


def header() -> str:
    import torch
    import transformers
    import triton

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"Device: **{dev}**; torch {torch.__version__}, triton {triton.__version__}, "
            f"transformers {transformers.__version__}; CUDA {torch.version.cuda}; "
            f"run {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.")


CPU_ONLY_TESTS = ("tests/test_ray.py", "tests/test_server.py", "tests/test_cli.py", "tests/test_engine_stress.py")


# --quick runs these first (the GPU code paths), then the rest of tests/, each test's result on its own line
# (-v), so that a run cut short by the budget still says what passed and what failed
GPU_FIRST_TESTS = ("tests/test_kernels_*.py", "tests/test_triton_model.py", "tests/test_graphs.py", "tests/test_csrc*.py",
                   "tests/test_generation.py", "tests/test_parity.py", "tests/test_engine.py")


def part_tests(tmp: Path) -> str:
    import glob

    if QUICK:
        first = [f for pat in GPU_FIRST_TESTS for f in sorted(glob.glob(str(ROOT / pat)))]
        args = [*(str(Path(f).relative_to(ROOT)) for f in first), "tests/", "-v",
                *(f"--ignore={f}" for f in CPU_ONLY_TESTS)]
    else:
        args = ["tests/", "-q"]
    rc, out = sh([sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider", "-rfs", "-s"], tmp / "tests.log")
    summary = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    fails = [ln for ln in out.splitlines() if ln.startswith("FAILED")]
    if QUICK and not fails:  # cut short before the summary: the streamed results
        fails = sorted({"FAILED " + ln.split(" FAILED")[0] for ln in out.splitlines() if " FAILED" in ln and "::" in ln})
    what = "`pytest tests/`" + (f" (GPU paths first, without {', '.join(CPU_ONLY_TESTS)})" if QUICK else "")
    if not summary and QUICK:
        counts = {k: sum(1 for ln in out.splitlines() if "::" in ln and f" {k.upper()}" in ln) for k in ("passed", "failed", "skipped")}
        summary = [", ".join(f"{v} {k}" for k, v in counts.items()) + " (streamed results)"]
    body = f"{what} on the GPU: **{summary[-1].strip('= ') if summary else 'no summary (rc %d)' % rc}**\n"
    if rc == 124:
        body += "\n(cut short: the run's budget ended before the tests did)\n"
    if fails:
        body += "\n" + "\n".join(f"- {ln}" for ln in fails[:30]) + "\n"
    lp = [ln for ln in out.splitlines() if re.match(r"torch\.(float16|bfloat16): triton", ln.strip())]
    if lp:
        body += "\nWhole-model low-precision error vs fp32 (triton vs plain PyTorch at that precision):\n\n" + \
                "\n".join(f"- {ln.strip()}" for ln in lp) + "\n"
    return body


QUICK_WORKLOADS = "(triton or sdpa) and (W1 or (W2 and not rothe))"  # pytest -k of --quick's workloads


def part_kernels(tmp: Path) -> str:
    md = tmp / "kernels.md"
    rc, out = sh([sys.executable, "benchmarks/bench_kernels.py", "--out", str(md)], tmp / "kernels.log")
    return md.read_text() if md.exists() else f"bench_kernels.py failed (rc {rc}); see log.\n"


def part_tiles(tmp: Path) -> str:
    md = tmp / "tiles.md"
    rc, out = sh([sys.executable, "benchmarks/bench_kernels.py", "--tiles", "--out", str(md)], tmp / "tiles.log")
    return md.read_text() if md.exists() else f"bench_kernels.py --tiles failed (rc {rc}); see log.\n"


def part_workloads(tmp: Path, name="workloads", files=("benchmarks/test_bench_workloads.py",)) -> str:
    js = tmp / f"{name}.json"
    only = ["-k", QUICK_WORKLOADS] if QUICK and name == "workloads" else []
    rc, out = sh([sys.executable, "-m", "pytest", *files, "-q", "-s", "-p", "no:cacheprovider",
                  "--benchmark-disable-gc", *only], tmp / f"{name}.log", env={"ENCDEC_BENCH_JSON": str(js)})
    table = [ln for ln in out.splitlines() if ln.startswith("|")]
    extra = [ln for ln in out.splitlines() if ln.startswith("ceilings:")]
    notes = [ln[len("note: "):] for ln in out.splitlines() if ln.startswith("note: ")]
    body = "\n".join(table) + "\n"
    if only:
        body = f"--quick: `-k \"{QUICK_WORKLOADS}\"`\n\n" + body
    if notes:
        body += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    if extra:
        body += f"\nMeasured ceilings: {extra[-1][len('ceilings: '):]}\n"
    if rc == 124:
        body += "\n(cut short: the run's budget ended; the rows above are those that finished)\n"
    elif rc != 0:
        body += f"\n(pytest exit code {rc}: " + "; ".join(ln for ln in out.splitlines() if ln.startswith("FAILED"))[:2000] + ")\n"
    return body


def part_profile(tmp: Path) -> str:
    """benchmarks/profile_step.py: W1's time per token, the captured step's replay alone, the kernels per step."""
    rc, out = sh([sys.executable, "benchmarks/profile_step.py"], tmp / "profile.log", timeout=600)
    keep = [ln.strip() for ln in out.splitlines() if ln.startswith(("generate:", "kernels per step:", "without CUDA graphs:"))]
    body = ("`python benchmarks/profile_step.py` (random bert-base + gpt2, bf16, batch 1, 512 source tokens, 128 new, "
            "greedy):\n\n" + "\n".join(f"- {ln}" for ln in keep) + "\n")
    lines = out.splitlines()
    head = next((i for i, ln in enumerate(lines) if "Name" in ln and "CUDA" in ln), None)
    if head is not None:  # the profiler's kernel table, top rows
        body += "\nOne eager step's kernels by CUDA time:\n\n```\n" + "\n".join(lines[head - 1:head + 20]) + "\n```\n"
    if rc != 0:
        body += f"\n(exit code {rc}{': cut short by the budget' if rc == 124 else ''}; see profile.log)\n"
    return body


def part_engine(tmp: Path) -> str:
    return part_workloads(tmp, "engine", ("benchmarks/test_bench_engine.py",))


def part_csrc(tmp: Path) -> str:
    """W1 (encdec_fast-triton) with the csrc kernels off (ENCDEC_CUDA=0) and all forced on (ENCDEC_CUDA=1), each
    run next to transformers-sdpa for the token check; same checkpoint, inputs and harness as part_workloads."""
    import json

    got, notes = {}, []
    for flag in ("0", "1"):
        js = tmp / f"csrc_{flag}.json"
        rc, out = sh([sys.executable, "-m", "pytest", "benchmarks/test_bench_workloads.py", "-q", "-s", "-p",
                      "no:cacheprovider", "--benchmark-disable-gc", "-k", "W1 and (triton or sdpa)"],
                     tmp / f"csrc_{flag}.log", env={"ENCDEC_BENCH_JSON": str(js), "ENCDEC_CUDA": flag})
        if rc != 0:
            notes.append(f"ENCDEC_CUDA={flag}: pytest exit code {rc}: "
                         + "; ".join(ln for ln in out.splitlines() if ln.startswith(("FAILED", "E ")))[:1500])
        rows = json.loads(js.read_text()) if js.exists() else []
        got[flag] = next((r for r in rows if r.get("provider") == "encdec_fast-triton"), None)
    body = "| W1 (b1 src512 new128 greedy) | tok/s | vs ENCDEC_CUDA=0 | vs transformers-sdpa | tokens = sdpa |\n"
    body += "| --- | ---: | ---: | ---: | ---: |\n"
    off = got["0"]["per_s"] if got["0"] else float("nan")
    for flag, label in (("0", "ENCDEC_CUDA=0 (Triton + cuBLAS)"), ("1", "ENCDEC_CUDA=1 (every csrc op)")):
        r = got[flag]
        if r is None:
            body += f"| {label} | no result | | | |\n"
            continue
        body += (f"| {label} | {r['per_s']:.1f} | {r['per_s'] / off:.3f}x | "
                 f"{r.get('speedup_vs_transformers_sdpa', float('nan')):.2f}x | "
                 f"{r.get('tokens_equal_to_transformers_sdpa', float('nan')):.3f} |\n")
    return body + "".join(f"\n{n}\n" for n in notes)


TITLES = {"tests": "GPU parity tests", "kernels": "Kernels vs PyTorch", "tiles": "Attention tiles per head dim",
          "workloads": "Workloads W1-W4", "profile": "Decode step profile", "engine": "Batch engine",
          "csrc": "W1 with the CUDA C++ kernels (csrc) off and on"}


def read_sections() -> dict[str, str]:
    if not RESULTS.exists():
        return {}
    text = RESULTS.read_text()
    secs = {}
    for key, title in TITLES.items():
        m = re.search(rf"## {re.escape(title)}\n(.*?)(?=\n## |\Z)", text, re.S)
        if m:
            secs[key] = m.group(1).strip() + "\n"
    return secs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true", help="the reduced run that fits a lent machine's session")
    ap.add_argument("--budget", type=float, help="seconds for the whole run; each part gets what is left")
    a = ap.parse_args()
    global QUICK, DEADLINE, PART_END
    QUICK = a.quick
    if a.budget:
        DEADLINE = time.monotonic() + a.budget
    parts = a.parts if a.parts != list(PARTS) or not QUICK else ["tests", "workloads", "profile", "kernels", "engine",
                                                                  "csrc"]
    secs = read_sections()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for p in parts:
            if DEADLINE is not None and DEADLINE - time.monotonic() < 30:
                print(f"skipped {p}: under 30 s of the budget left", flush=True)
                continue
            PART_END = time.monotonic() + QUICK_SHARES[p] * a.budget if QUICK and a.budget and p in QUICK_SHARES else None
            secs[p] = header() + "\n\n" + globals()[f"part_{p}"](tmp)
            write(secs)
            if a.out:  # after each part, so a run cut short still returns what it finished
                for f in [*tmp.iterdir(), RESULTS]:
                    shutil.copy(f, Path(a.out) / f.name)


def write(secs):
    text = "# encdec_fast GPU results\n\nWritten by `python benchmarks/gpu_report.py`; each section names its device, versions and date.\n"
    for key in PARTS:
        if key in secs:
            text += f"\n## {TITLES[key]}\n\n{secs[key].strip()}\n"
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
