"""What the csrc tests share: getting the built library (or a reason to skip), and processor pipelines
whose bans really fire on the token sequences made here."""

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
    """(rows, length) int64 from a small alphabet (so n-grams repeat); rows 0 and 1 end with the prefixes
    of the bad words of pipeline("bad_words")."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, alphabet, (rows, length), generator=g)
    if length >= 2 and rows >= 2:
        ids[0, -1] = 7
        ids[1, -2:] = torch.tensor([9, 10])
    return ids


def scores(rows: int, vocab: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * 3).to(dtype)


PIPELINES = ("none", "repetition", "ngram2", "ngram3", "bad_words", "min_length", "all")


def pipeline(kind: str, vocab: int, length: int, device="cpu") -> sel.Pipeline:
    """A processor pipeline of decode/select.py; min_length is active for sequences of `length` tokens."""
    rp = sel.RepetitionPenalty(1.3)
    bw = sel.BadWords([[5], [2], [7, 8], [9, 10, 11], [vocab - 1]], EOS, vocab, device)  # [2] is eos: dropped
    ml = sel.MinLength(length + 1, EOS, vocab, device)
    steps = {"none": [], "repetition": [rp], "ngram2": [sel.NoRepeatNGram(2)], "ngram3": [sel.NoRepeatNGram(3)],
             "bad_words": [bw], "min_length": [ml], "all": [rp, sel.NoRepeatNGram(3), bw, ml]}[kind]
    return sel.Pipeline(steps)
