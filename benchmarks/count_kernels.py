"""How many kernels does one decode step launch? Counted on any device, the CPU included.

    python benchmarks/count_kernels.py                          # bert2gpt2, 12 layers, torch backend
    python benchmarks/count_kernels.py --backend triton         # Triton kernels (the interpreter off CUDA)
    python benchmarks/count_kernels.py --ckpt PATH --rows 4 --top 20
    python benchmarks/count_kernels.py --backend triton --whole   # the whole step: token choice included

Two counters run around the step: a TorchDispatchMode counts every aten op that does work (views,
empty allocations and other metadata-only ops excluded; ``.item()``-style host reads counted apart as
syncs), and a hook on Triton's launch path (``kernel[grid](...)``) counts every Triton launch by
kernel name. On a GPU each counted aten op is about one CUDA kernel (cuBLAS GEMMs may add a second
small one), so ``total`` approximates the step's kernels in a CUDA graph; profile_step.py measures
the real list on a GPU. ``count_kernels(fn)`` counts any callable, so the decode step of the
new decode state can be passed as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that allocate or describe memory without launching a kernel
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "detach",
              "resize_", "set_", "_reshape_alias", "alias", "is_same_size", "_has_compatible_shallow_copy_type"}
_HOST_READS = {"item", "_local_scalar_dense", "equal", "is_nonzero"}


@dataclass
class KernelCount:
    aten: Counter = field(default_factory=Counter)  # op name -> launches
    triton: Counter = field(default_factory=Counter)  # kernel name -> launches
    host_reads: Counter = field(default_factory=Counter)  # op name -> device-to-host reads
    inside_triton: int = 0  # > 0 while a Triton launch runs (the CPU interpreter's own copies are not counted)

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values())

    def table(self, top: int = 15) -> str:
        lines = [f"kernels: {self.total} (aten {sum(self.aten.values())}, triton {sum(self.triton.values())}); "
                 f"host reads: {sum(self.host_reads.values())}"]
        rows = [(n, f"triton:{k}") for k, n in self.triton.items()] + [(n, f"aten:{k}") for k, n in self.aten.items()]
        for n, name in sorted(rows, reverse=True)[:top]:
            lines.append(f"  {n:5d}  {name}")
        return "\n".join(lines)


class _AtenCounter(TorchDispatchMode):
    def __init__(self, count: KernelCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.count.inside_triton:
            pass
        elif name in _HOST_READS:
            self.count.host_reads[name] += 1
        elif not (func.is_view or name in _NO_KERNEL or name.startswith("sym_")):
            self.count.aten[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _count_triton_launches(count: KernelCount):
    """Counts ``kernel[grid](...)`` calls (compiled or interpreted kernels alike)."""
    from triton.runtime.jit import KernelInterface

    original = KernelInterface.__getitem__

    def getitem(self, grid):
        launch = original(self, grid)
        name = getattr(getattr(self, "fn", None), "__name__", type(self).__name__)

        def counted(*args, **kwargs):
            count.triton[name] += 1
            count.inside_triton += 1
            try:
                return launch(*args, **kwargs)
            finally:
                count.inside_triton -= 1

        return counted

    KernelInterface.__getitem__ = getitem
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


def count_kernels(fn, *args, **kwargs) -> KernelCount:
    """Runs fn(*args, **kwargs) once under both counters and returns what it launched."""
    count = KernelCount()
    triton_hook = contextlib.nullcontext()
    try:
        import triton  # noqa: F401

        triton_hook = _count_triton_launches(count)
    except ImportError:
        pass
    with torch.inference_mode(), triton_hook, _AtenCounter(count):
        fn(*args, **kwargs)
    return count


def decode_step_fn(model, rows: int = 1, src_len: int = 16, pos: int = 3):
    """A closure running one eager Decoder.step of `model` for `rows` rows whose caches already hold
    `pos` tokens, against encoder output of `src_len` tokens (computed once, outside the count)."""
    from encdec_fast.decode.state import KVCache

    dev, dcfg = model.device, model.cfg.decoder
    ids = torch.randint(5, model.cfg.encoder.vocab_size, (rows, src_len), device=dev)
    with torch.inference_mode():
        enc, _ = model.encode_packed(ids)  # (rows * src_len, E)
        cross = model.net.decoder.cross_kv(model.net.project(enc, model.ops), model.ops)  # per layer (T, H, D)
    cache = KVCache(dcfg, rows, pos + 8, dtype=model.dtype, device=dev)
    seq = torch.full((rows, pos + 1), 5, dtype=torch.long, device=dev)  # row n feeds seq[n, pos] at position pos
    t = torch.full((rows,), pos + 1, dtype=torch.long, device=dev)
    enc_lens = torch.full((rows,), src_len, dtype=torch.int32, device=dev)
    starts = torch.arange(rows, device=dev) * src_len  # row n's encoder keys in the packed K/V

    def step():
        return model.net.decoder.step(seq, t, cache.layers, cross, starts, enc_lens, src_len, model.ops)

    return step


def state_step_fn(model, rows: int = 1, src_len: int = 16, new_tokens: int = 16):
    """A closure running one whole decode step of generate()'s (decoder, token choice, bookkeeping: decode/step.py
    through decode/runner.py) for `rows` greedy rows, after two warm-up steps, against `src_len` source tokens."""
    from encdec_fast.decode import select as sel
    from encdec_fast.decode.runner import StepRunner
    from encdec_fast.decode.state import DecodeState
    from encdec_fast.decode.step import StepPlan

    dev = model.device
    ids = torch.randint(5, model.cfg.encoder.vocab_size, (rows, src_len), device=dev)
    with torch.no_grad():  # not inference_mode: the state's buffers are updated in place by later steps
        enc, packing = model.encode_packed(ids)
        cross = model.net.decoder.cross_kv(model.net.project(enc, model.ops), model.ops)  # per layer (T, H, D)
        state = DecodeState(model, rows, 1 + new_tokens + 3, 1, packing.total)
        state.set_cross(torch.arange(packing.total, device=dev), cross)
        cfg = sel.RowConfig(eos=[2], pad=0)
        plan = StepPlan(spec=sel.Spec.of([cfg]))
        start = torch.full((rows, 1), 3, dtype=torch.long, device=dev)
        state.join(list(range(rows)), start, cfg, enc_start=packing.cu_seqlens[:-1].long(),
                   enc_len=torch.tensor(packing.lengths, dtype=torch.int32, device=dev), limit=1 + new_tokens, fill=0)
        runner = StepRunner(state)
        runner.step(plan)
        runner.step(plan)
    return lambda: runner.step(plan)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", help="an EncoderDecoderModel folder (default: a random bert2gpt2, 12 layers)")
    ap.add_argument("--backend", choices=["torch", "triton"], default="torch")
    ap.add_argument("--layers", type=int, default=12, help="layers of the default checkpoint")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--src", type=int, default=16)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--whole", action="store_true", help="the whole decode step (token choice and bookkeeping "
                    "included), not the decoder alone")
    a = ap.parse_args(argv)
    if a.backend == "triton" and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before encdec_fast.kernels imports triton
    import encdec_fast

    sys.path.insert(0, str(Path(__file__).parent))
    import workloads as W

    with tempfile.TemporaryDirectory() as d:
        path = a.ckpt or W.build_bert2gpt2(d, layers=a.layers, hidden=64, heads=4, enc_vocab=100, dec_vocab=100)
        model = encdec_fast.load(path, backend=a.backend)
    step = (state_step_fn if a.whole else decode_step_fn)(model, rows=a.rows, src_len=a.src)
    step()  # warm-up: first-call work (compilation, lazy init) is not part of a step
    count = count_kernels(step)
    layers = model.cfg.decoder.num_layers
    print(f"{model.cfg.decoder.family} decoder, {layers} layers, backend {a.backend}, {a.rows} rows, "
          f"device {model.device}")
    print(count.table(a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
