"""What the csrc tests share: getting the built library (or a reason to skip), and rows of tokens with
their selection tables (decode/select.py's RowTables and Spec) whose bans really fire on them."""

import os

import pytest
import torch

from encdec_fast import csrc
from encdec_fast.decode import select as sel
from encdec_fast.errors import CudaKernelError

# .ci/run sets this: there a missing nvcc or a broken build fails the tests instead of skipping them
REQUIRE_BUILD = os.environ.get("ENCDEC_CSRC_REQUIRE_BUILD") == "1"
EOS = [2, 3]


def nvcc_or_skip() -> str:
    """nvcc's path; skipped without one (failed where REQUIRE_BUILD)."""
    nvcc = csrc.find_nvcc()
    if nvcc is None:
        if REQUIRE_BUILD:
            pytest.fail("ENCDEC_CSRC_REQUIRE_BUILD=1 but nvcc is not installed: csrc/ cannot be built")
        pytest.skip("nvcc is not installed: csrc/ cannot be built here")
    return nvcc


def library_or_skip() -> csrc.Library:
    """The library built from csrc/; skipped without nvcc (failed where REQUIRE_BUILD), failed on a broken build."""
    if not os.environ.get("ENCDEC_CUDA_LIB"):
        nvcc_or_skip()
    try:
        return csrc.library()
    except CudaKernelError as e:
        pytest.fail(f"csrc/ does not build or load:\n{e}")


def token_ids(rows: int, length: int, seed: int = 0, alphabet: int = 12) -> torch.Tensor:
    """(rows, length) int64 from a small alphabet (so n-grams repeat)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, alphabet, (rows, length), generator=g)


def scores(rows: int, vocab: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * 3).to(dtype)


KINDS = ("none", "repetition", "ngram2", "ngram3", "bad_words", "min_length", "all", "mixed")


def row_configs(kind: str, rows: int, vocab: int, length: int) -> list[sel.RowConfig]:
    """Each row's settings, resolved from a GenerationConfig as generate() resolves them; "mixed" gives the
    rows different settings (penalties, n-gram sizes, bad words, eos ids, min lengths), as the Engine's
    rows of different requests have. min_length bans eos for rows of `length` tokens."""
    from transformers import GenerationConfig

    bad = [[5], [2], [7, 8], [9, 10, 11], [vocab - 1]]  # [2] is an eos id: dropped
    kinds = {
        "none": {}, "repetition": dict(repetition_penalty=1.3), "ngram2": dict(no_repeat_ngram_size=2),
        "ngram3": dict(no_repeat_ngram_size=3), "bad_words": dict(bad_words_ids=bad),
        "min_length": dict(min_length=length + 1),
        "all": dict(repetition_penalty=1.3, no_repeat_ngram_size=3, bad_words_ids=bad, min_length=length + 1),
    }
    mixed = [(kinds["all"], EOS), ({}, EOS), (dict(repetition_penalty=0.7, no_repeat_ngram_size=2), [3]),
             (dict(bad_words_ids=[[4], [6, 1], [9, 10, 11]], min_length=length + 5), [4, 1, 0]),
             (dict(no_repeat_ngram_size=1, repetition_penalty=2.0, min_length=2), None)]
    out = []
    for r in range(rows):
        kw, eos = mixed[r % len(mixed)] if kind == "mixed" else (kinds[kind], EOS)
        gc = GenerationConfig(**kw)
        out.append(sel.RowConfig.from_generation_config(gc, prompt_len=1, eos=eos, pad=0, vocab_size=vocab))
    return out


def selection_case(kind: str, rows: int, vocab: int, length: int, *, lens=None, seed: int = 0, device="cpu"):
    """-> (seq (rows, length + 5), t (rows,), RowTables, Spec): rows holding seq[r, :t[r]] (t = length, or
    lens), their tables filled by RowTables.assign as DecodeState.join fills them. Row r % 3 == 0 ends with
    7 and row r % 3 == 1 with 9, 10 (prefixes of the bad words); the slots past t hold tokens too, which
    the processors must not read."""
    seq = token_ids(rows, length + 5, seed)
    t = torch.full((rows,), length) if lens is None else torch.as_tensor(lens).clone()
    for r in range(rows):
        n = int(t[r])
        if r % 3 == 0 and n >= 1:
            seq[r, n - 1] = 7
        elif r % 3 == 1 and n >= 2:
            seq[r, n - 2:n] = torch.tensor([9, 10])
    seq, t = seq.to(device), t.to(device)
    configs = row_configs(kind, rows, vocab, length)
    tables = sel.RowTables(rows, vocab, device)
    by_setting: dict = {}  # rows of equal settings and length join together
    for r, cfg in enumerate(configs):
        by_setting.setdefault((cfg.key(), int(t[r])), (cfg, []))[1].append(r)
    for (_, n), (cfg, rs) in by_setting.items():
        idx = torch.tensor(rs, device=device)
        tables.assign(idx, cfg, seq[idx, :n])
    return seq, t, tables, sel.Spec.of(configs)
