"""The working tree's encdec_fast against another git revision's, in one process: same checkpoint, inputs and
threads, runs alternating (so that load from other processes hits both alike); tokens compared.

    python benchmarks/ab_versions.py REV [--size small|base] [--rounds 7] [--threads 2]

REV's `encdec_fast/` and `kernels/` are exported (git archive) into a temporary folder as the package
`encdec_fast_ab` (its imports are relative, so it runs beside this tree's `encdec_fast`), with its `csrc/` beside
it (so that it builds and loads its own CPU kernels). --quantize / --dtype load both models so. Cases: generate()
greedy and beam 4 at batch 1 and 8, and the Engine on a mixed workload. Prints, per case, the median of
the per-round time ratios REV / working tree (above 1: the working tree is faster) and whether the tokens
are equal. CPU only (a GPU run compares captured graphs the same way with --device cuda).
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))


def export(rev: str, dest: Path):
    """REV's encdec_fast/ (with kernels/ inside, as setup.py installs it) as the package dest/encdec_fast_ab."""
    raw = subprocess.run(["git", "archive", rev, "encdec_fast", "kernels", "csrc"], cwd=ROOT, check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        tar.extractall(dest / "src", filter="data")
    (dest / "src" / "csrc").rename(dest / "csrc")  # where the package's cpu/kernels.py looks for its source
    pkg = dest / "encdec_fast_ab"
    (dest / "src" / "encdec_fast").rename(pkg)
    link = pkg / "kernels"
    if link.is_symlink() or link.exists():
        link.unlink()
    (dest / "src" / "kernels").rename(link)
    for f in pkg.rglob("*.py"):  # the few absolute self-imports (public names) become the renamed package's
        text = f.read_text()
        if "import encdec_fast" in text or "from encdec_fast" in text:
            f.write_text(text.replace("from encdec_fast", "from encdec_fast_ab").replace("import encdec_fast",
                                                                                          "import encdec_fast_ab"))
    sys.path.insert(0, str(dest))
    return importlib.import_module("encdec_fast_ab")


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def compare(name: str, old, new, rounds: int):
    """Alternating runs (old first, then new first); -> prints median old/new and token equality."""
    old(), new()  # warm-up
    ratios, same = [], True
    for r in range(rounds):
        order = (old, new) if r % 2 == 0 else (new, old)
        (ta, a), (tb, b) = timed(order[0]), timed(order[1])
        t_old, t_new, out_old, out_new = (ta, tb, a, b) if r % 2 == 0 else (tb, ta, b, a)
        ratios.append(t_old / t_new)
        same &= out_old == out_new
    print(f"{name:28s} old/new {statistics.median(ratios):5.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
          f"tokens equal: {same}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rev")
    ap.add_argument("--size", choices=["small", "base"], default="small")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantize", choices=["int8"], default=None)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    from conftest import _BASE, GenBenchSize, build_bert2gpt2, gen_inputs

    import encdec_fast

    size = (GenBenchSize(12, 768, 12, 30522, 50257, 1024, 128, 32) if a.size == "base"
            else GenBenchSize(4, 256, 4, 8000, 8000, 512, 48, 24))
    assert _BASE  # the same sizes module the generate benchmarks use
    with tempfile.TemporaryDirectory() as d:
        ab = export(a.rev, Path(d))
        path = build_bert2gpt2(str(Path(d) / "ckpt"), size)
        kw = {"quantize": a.quantize} if a.quantize else {}
        kw |= {"dtype": getattr(torch, a.dtype)} if a.dtype else {}
        old, new = ab.load(path, **kw), encdec_fast.load(path, **kw)
        print(f"{a.rev} vs the working tree, {a.size} bert2gpt2 {kw or ''}, cpu, {a.threads} threads, {a.rounds} "
              "rounds")
        with torch.inference_mode():
            for mode, kw in (("greedy", {}), ("beam4", dict(num_beams=4))):
                for batch in (1, 8):
                    ids, mask = gen_inputs(batch, size)

                    def run(m, ids=ids, mask=mask, kw=kw):
                        return lambda: m.generate(ids, attention_mask=mask, max_new_tokens=size.new_tokens,
                                                  **kw).tolist()

                    compare(f"generate {mode} b{batch}", run(old), run(new), a.rounds)
        g = torch.Generator().manual_seed(1)
        inputs = [torch.randint(3, size.enc_vocab, (int(n),), generator=g).tolist()
                  for n in torch.randint(4, size.src_len, (32,), generator=g)]
        kws = [dict(max_new_tokens=int(n)) | ({"num_beams": 2} if i % 4 == 0 else {})
               for i, n in enumerate(torch.randint(2, size.new_tokens, (32,), generator=g))]

        def engine(lib, model):
            def go():
                with lib.Engine(model, max_batch_size=16) as eng:
                    return [r.output_ids for r in eng.generate(inputs, request_kwargs=kws)]
            return go

        compare("Engine, 32 mixed requests", engine(ab, old), engine(encdec_fast, new), max(3, a.rounds // 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
