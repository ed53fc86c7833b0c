"""The CPU precision table: transformers fp32 and bf16 against encdec_fast fp32, bf16 and int8, greedy and beam 4
at batch 1 and 8, all five timed in one process, alternating run by run (so that load from other processes hits
them alike), medians reported as speed-ups over transformers fp32 (bf16 also over transformers bf16).

Tokens are compared too: encdec_fast fp32 must equal transformers fp32 (asserted); bf16 and int8 report their
agreement with transformers fp32 (rows identical, and the mean share of new tokens before the first difference).
The checkpoint is test_bench_generate.py's random bert2gpt2 (weights std 0.05) with its word embeddings' std (and
so the tied LM head's) raised to 0.2, so that next-token distributions are peaked as a trained model's (top
probability 0.60 at base size, where 0.05 gives 0.002 and near-ties everywhere; raising every weight's std makes the
random net chaotic instead: at 0.2 even bf16 agrees on a third of the tokens); and every run generates all new
tokens (eos_token_id=None: the same work for every implementation, whatever tokens it picks).

    ENCDEC_BENCH_SIZE=base pytest benchmarks/test_bench_cpu_precision.py -s   # bert-base + gpt2, 128 source
                                                                               # tokens, 32 new (issue 19's case)
    pytest benchmarks/test_bench_cpu_precision.py                              # a small model (minutes less)

ENCDEC_BENCH_ROUNDS (default 3) sets the alternating rounds per case; torch runs on 2 threads.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU precision table (CPU only)")

IMPLS = ("transformers fp32", "transformers bf16", "encdec_fast fp32", "encdec_fast bf16", "encdec_fast int8")
CASES = [("greedy", 1), ("greedy", 8), ("beam4", 1), ("beam4", 8)]
MODES = {"greedy": dict(eos_token_id=None), "beam4": dict(num_beams=4, eos_token_id=None)}
STD, EMBED_STD = 0.05, 0.2  # the weights' std, the word embeddings': peaked next-token distributions
ROUNDS = int(os.environ.get("ENCDEC_BENCH_ROUNDS", "3"))
THREADS = 2


@pytest.fixture(scope="module")
def precision_models(tmp_path_factory):
    import transformers as T
    from conftest import GEN_SIZE, build_bert2gpt2
    from transformers.utils import logging as hf_logging

    import encdec_fast

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(THREADS)
    path = build_bert2gpt2(str(tmp_path_factory.mktemp("cpu_precision")), GEN_SIZE, std=STD, embed_std=EMBED_STD)
    models = {
        "transformers fp32": T.EncoderDecoderModel.from_pretrained(path).eval(),
        "transformers bf16": T.EncoderDecoderModel.from_pretrained(path, dtype=torch.bfloat16).eval(),
        "encdec_fast fp32": encdec_fast.load(path),
        "encdec_fast bf16": encdec_fast.load(path, dtype=torch.bfloat16),
        "encdec_fast int8": encdec_fast.load(path, quantize="int8"),
    }
    return GEN_SIZE, models


def _run(model, ids, mask, new_tokens, kw):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, **kw)


def agreement(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """(share of rows identical to ref, mean share of new tokens before the first difference)."""
    n = min(ref.shape[1], out.shape[1])
    diff = ref[:, 1:n] != out[:, 1:n]
    first = torch.where(diff.any(1), diff.int().argmax(1), torch.full((ref.shape[0],), n - 1))
    same = (first == n - 1) & (ref.shape[1] == out.shape[1])
    return same.float().mean().item(), (first.float() / max(1, ref.shape[1] - 1)).mean().item()


@pytest.mark.parametrize("mode,batch", CASES, ids=[f"{m}-b{b}" for m, b in CASES])
def test_cpu_precision(precision_models, cpu_precision_table, mode, batch):
    from conftest import gen_inputs

    size, models = precision_models
    ids, mask = gen_inputs(batch, size)
    kw = MODES[mode]
    outs = {name: _run(m, ids, mask, size.new_tokens, kw) for name, m in models.items()}  # warm-up + tokens
    times = {name: [] for name in models}
    for r in range(ROUNDS):
        order = list(models)[r % len(models):] + list(models)[:r % len(models)]  # rotate who goes first
        for name in order:
            t0 = time.perf_counter()
            _run(models[name], ids, mask, size.new_tokens, kw)
            times[name].append(time.perf_counter() - t0)
    ref = outs["transformers fp32"]
    row = {"seconds": {n: statistics.median(t) for n, t in times.items()},
           "agreement": {n: agreement(ref, o) for n, o in outs.items()}, "load": os.getloadavg()[0]}
    cpu_precision_table.rows[(mode, batch)] = row
    cpu_precision_table.format = format_table
    assert torch.equal(outs["encdec_fast fp32"], ref), "encdec_fast fp32 tokens differ from transformers fp32"


def format_table(rows: dict, size) -> list[str]:
    """The markdown table of the recorded rows (conftest prints it at the end of the session)."""
    lines = [f"CPU precision: bert2gpt2 {size.layers}x{size.hidden} (weights std {STD}, word embeddings {EMBED_STD}), "
             f"vocab {size.dec_vocab}, "
             f"source <= {size.src_len}, "
             f"{size.new_tokens} new tokens, {THREADS} threads, median of {ROUNDS} alternating runs; speed-up over "
             "transformers fp32 (bf16: also over transformers bf16); agreement with transformers fp32 tokens: rows "
             "identical / mean share of new tokens before the first difference",
             "| case | " + " | ".join(IMPLS) + " | load avg |",
             "| --- |" + " --- |" * (len(IMPLS) + 1)]
    for (mode, batch), row in sorted(rows.items()):
        s, a = row["seconds"], row["agreement"]
        base = s["transformers fp32"]
        cells = []
        for name in IMPLS:
            cell = f"{base / s[name]:.2f}x" + (f" ({s[name]:.2f} s)" if name == "transformers fp32" else "")
            if name == "encdec_fast bf16":
                cell += f", {s['transformers bf16'] / s[name]:.2f}x bf16"
            if name in ("encdec_fast bf16", "encdec_fast int8", "transformers bf16"):
                cell += f"; {a[name][0]:.0%} / {a[name][1]:.0%}"
            elif name == "encdec_fast fp32":
                cell += "; =" if a[name][0] == 1.0 else "; DIFFERENT"
            cells.append(cell)
        lines.append(f"| {mode}, batch {batch} | " + " | ".join(cells) + f" | {row['load']:.1f} |")
    return lines
