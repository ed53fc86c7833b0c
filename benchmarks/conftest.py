"""Shared fixtures for the generate() benchmarks (test_bench_generate.py).

gen_bench: one bert2gpt2 checkpoint with random weights, built with transformers in a temporary folder
(bert-base + gpt2 sizes when CUDA is present; shrunk on the CPU so the suite stays short there), both
models loaded once (encdec_fast and transformers, same device and dtype), and a results table printed
at the end of the session.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch

CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class GenBenchSize:
    layers: int
    hidden: int
    heads: int
    enc_vocab: int
    dec_vocab: int
    positions: int
    src_len: int  # longest source row; the others are padded shorter
    new_tokens: int


# bert-base encoder + gpt2 (small) decoder on the GPU; 4 layers x 256 on the CPU, unless
# ENCDEC_BENCH_SIZE=base asks for bert-base + gpt2 there too (128 source tokens, 32 new: the README's CPU case)
_BASE = GenBenchSize(12, 768, 12, 30522, 50257, 1024, 128, 64)
GEN_SIZE = (_BASE if CUDA else
            GenBenchSize(12, 768, 12, 30522, 50257, 1024, 128, 32) if os.environ.get("ENCDEC_BENCH_SIZE") == "base"
            else GenBenchSize(4, 256, 4, 8000, 8000, 512, 48, 24))
GEN_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
    os.environ.get("ENCDEC_BENCH_DTYPE", "fp16" if CUDA else "fp32")]
GEN_DEVICE = torch.device("cuda" if CUDA else "cpu")


def build_bert2gpt2(path: str, size: GenBenchSize, seed: int = 0, std: float = 0.05, embed_std=None) -> str:
    """Save a random bert2gpt2 of this size (workloads.build_bert2gpt2; std: its weights', embed_std: its word
    embeddings')."""
    from workloads import build_bert2gpt2 as build

    return build(path, layers=size.layers, hidden=size.hidden, heads=size.heads, enc_vocab=size.enc_vocab,
                 dec_vocab=size.dec_vocab, positions=size.positions, enc_positions=max(512, size.src_len), seed=seed,
                 std=std, embed_std=embed_std)


def gen_inputs(batch: int, size: GenBenchSize, seed: int = 0):
    """Random source ids (never 0-2), right-padded rows of varied length; the first row is the longest."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, size.enc_vocab, (batch, size.src_len), generator=g)
    lens = torch.randint(max(1, size.src_len // 2), size.src_len + 1, (batch,), generator=g)
    lens[0] = size.src_len
    mask = (torch.arange(size.src_len)[None, :] < lens[:, None]).long()
    return ids.masked_fill(mask == 0, 0).to(GEN_DEVICE), mask.to(GEN_DEVICE)


def sync():
    if CUDA:
        torch.cuda.synchronize()


@dataclass
class GenBench:
    """What test_bench_generate.py needs (reached through the fixture: `from conftest import` would be
    ambiguous when tests/ and benchmarks/ are collected together)."""

    path: str
    size: GenBenchSize
    ours: object
    hf: object
    dtype: torch.dtype = GEN_DTYPE
    rows: dict = field(default_factory=dict)  # (mode, batch, impl) -> {"seconds": ..., "output": ...}

    def inputs(self, batch: int):
        return gen_inputs(batch, self.size)

    @staticmethod
    def sync():
        sync()


_RESULTS: list[GenBench] = []


@dataclass
class Table:
    """A benchmark's rows, printed at the end of the session with the lines its own format(rows, size) gives."""

    rows: dict = field(default_factory=dict)
    format: object = None


_PRECISION = Table()  # test_bench_cpu_precision.py's rows: (mode, batch) -> measurements


@pytest.fixture(scope="session")
def cpu_precision_table():
    return _PRECISION


@pytest.fixture(scope="session")
def gen_bench(tmp_path_factory):
    import transformers as T

    import encdec_fast

    path = build_bert2gpt2(str(tmp_path_factory.mktemp("gen_bench_bert2gpt2")), GEN_SIZE)
    ours = encdec_fast.load(path, device=GEN_DEVICE, dtype=GEN_DTYPE)
    hf = T.EncoderDecoderModel.from_pretrained(path, dtype=GEN_DTYPE).to(GEN_DEVICE).eval()
    bench = GenBench(path, GEN_SIZE, ours, hf)
    _RESULTS.append(bench)
    return bench


def pytest_terminal_summary(terminalreporter):
    if _PRECISION.rows:
        terminalreporter.write_sep("-", "CPU precision table")
        for line in _PRECISION.format(_PRECISION.rows, GEN_SIZE):
            terminalreporter.write_line(line)
    for bench in _RESULTS:
        rows = bench.rows
        if not rows:
            continue
        s = bench.size
        tr = terminalreporter
        tr.write_sep("-", f"generate(): encdec_fast vs transformers, bert2gpt2 {s.layers}x{s.hidden}, "
                          f"vocab {s.dec_vocab}, src <= {s.src_len}, {s.new_tokens} new tokens, {GEN_DEVICE}, "
                          f"{str(GEN_DTYPE).replace('torch.', '')}")
        tr.write_line("| mode | batch | transformers s | encdec_fast s | speedup (separate runs) | "
                      "speedup (alternating runs) | tokens equal |")
        tr.write_line("| --- | --- | --- | --- | --- | --- | --- |")
        for mode, batch in sorted({(m, b) for m, b, _ in rows}):
            hf, ours = rows.get((mode, batch, "transformers")), rows.get((mode, batch, "encdec_fast"))
            if hf is None or ours is None:
                continue
            same = (hf["output"].shape == ours["output"].shape and bool((hf["output"] == ours["output"]).all()))
            tr.write_line(f"| {mode} | {batch} | {hf['seconds']:.4f} | {ours['seconds']:.4f} | "
                          f"{hf['seconds'] / ours['seconds']:.2f}x | {ours.get('speedup', float('nan')):.2f}x | {same} |")
