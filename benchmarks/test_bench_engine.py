"""Engine throughput on a mixed-length workload: encdec_fast.Engine (continuous batching)
vs sorted static batches through encdec_fast's model.generate vs the same static batches through
transformers' EncoderDecoderModel.generate. Same checkpoint, device, dtype and inputs for all three.

Workload: requests with source lengths uniform in [8, 512] and output budgets (max_new_tokens per
request) uniform in [4, 128], greedy, the checkpoint's eos. Static batching is what a user without an
engine does: sort by source length, cut into batches of max_batch_size, run each batch to its largest
budget and cut every row to its own budget. The engine serves every request at its own budget.

After a warm-up on a few requests, the three systems run in turn, ROUNDS times (load from other
processes then hits all alike); median times, requests/s, generated tokens/s and the engine's speedups
(median of the per-round ratios) go to extra_info and are printed. The engine's outputs must equal the static
batches' (fp32); agreement with transformers' tokens is recorded. The checkpoint is conftest's random
bert2gpt2: bert-base + gpt2 sizes with CUDA (fp16 unless ENCDEC_BENCH_DTYPE says otherwise), 4 x 256
on the CPU; ENCDEC_BENCH_ENGINE_N sets the number of requests.

    pytest benchmarks/test_bench_engine.py -s
"""

import os
import statistics
import time
import warnings

import pytest
import torch
from conftest import CUDA, GenBenchSize, build_bert2gpt2, sync
from conftest import GEN_DEVICE as DEVICE
from conftest import GEN_DTYPE as DTYPE

N_REQUESTS = int(os.environ.get("ENCDEC_BENCH_ENGINE_N", 512 if CUDA else 128))
BATCH = 64 if CUDA else 16
SRC, BUDGET = (8, 512), (4, 128)
ROUNDS = int(os.environ.get("ENCDEC_BENCH_ENGINE_ROUNDS", 3))
SIZE = (GenBenchSize(12, 768, 12, 30522, 50257, 1024, SRC[1], BUDGET[1]) if CUDA
        else GenBenchSize(4, 256, 4, 8000, 8000, 1024, SRC[1], BUDGET[1]))


def mixed_workload(n: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(SRC[0], SRC[1] + 1, (n,), generator=g).tolist()
    budgets = torch.randint(BUDGET[0], BUDGET[1] + 1, (n,), generator=g).tolist()
    inputs = [torch.randint(3, vocab, (m,), generator=g).tolist() for m in lens]
    return inputs, budgets


def cut(row: list[int], budget: int, eos: int) -> list[int]:
    """A row of a static batch as the request alone gives it: its own budget, ended at eos."""
    row = row[:budget + 1]
    return row[:row.index(eos, 1) + 1] if eos in row[1:] else row


def run_static(model, inputs, budgets, eos):
    """Sorted static batches through model.generate; -> outputs in input order."""
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    out = [None] * len(inputs)
    with torch.inference_mode():
        for k in range(0, len(order), BATCH):
            idx = order[k:k + BATCH]
            S = max(len(inputs[i]) for i in idx)
            ids = torch.zeros(len(idx), S, dtype=torch.long)
            mask = torch.zeros(len(idx), S, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, :len(inputs[i])] = torch.tensor(inputs[i])
                mask[r, :len(inputs[i])] = 1
            rows = model.generate(ids.to(DEVICE), attention_mask=mask.to(DEVICE),
                                  max_new_tokens=max(budgets[i] for i in idx)).tolist()
            for r, i in enumerate(idx):
                out[i] = cut(rows[r], budgets[i], eos)
    sync()
    return out


def run_engine(engine, inputs, budgets):
    res = engine.generate(inputs, request_kwargs=[{"max_new_tokens": b} for b in budgets])
    sync()
    return [r.output_ids for r in res]


@pytest.fixture(scope="module")
def engine_bench(tmp_path_factory):
    import transformers as T

    import encdec_fast

    path = build_bert2gpt2(str(tmp_path_factory.mktemp("engine_bench")), SIZE)
    ours = encdec_fast.load(path, device=DEVICE, dtype=DTYPE)
    hf = T.EncoderDecoderModel.from_pretrained(path, dtype=DTYPE).to(DEVICE).eval()
    return ours, hf


def test_bench_engine_mixed_workload(benchmark, engine_bench):
    from transformers.utils import logging as hf_logging

    import encdec_fast

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    ours, hf = engine_bench
    eos = ours.generation_config.eos_token_id
    inputs, budgets = mixed_workload(N_REQUESTS, SIZE.enc_vocab)
    warm_in, warm_b = mixed_workload(4, SIZE.enc_vocab, seed=1)

    with encdec_fast.Engine(ours, max_batch_size=BATCH) as engine:
        run_engine(engine, warm_in, warm_b)  # warm-up: first calls, buffer growth
        run_static(ours, warm_in, warm_b, eos)
        run_static(hf, warm_in, warm_b, eos)
        times = {"engine": [], "static": [], "transformers": []}
        first = {}  # the first round's outputs of the static batches
        for r in range(ROUNDS):  # the three in turn, so that load from other processes hits all alike
            t0 = time.perf_counter()
            if r == 0:
                got = benchmark.pedantic(run_engine, args=(engine, inputs, budgets), rounds=1, iterations=1)
            else:
                run_engine(engine, inputs, budgets)
            times["engine"].append(time.perf_counter() - t0)
            for name, model in (("static", ours), ("transformers", hf)):
                t0 = time.perf_counter()
                out = run_static(model, inputs, budgets, eos)
                times[name].append(time.perf_counter() - t0)
                if r == 0:
                    first[name] = out
        stats = engine.stats

    tokens = sum(len(r) - 1 for r in got)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {k: statistics.median(a / b for a, b in zip(times[k], times["engine"])) for k in ("static", "transformers")}
    info = {
        "device": str(DEVICE), "dtype": str(DTYPE).replace("torch.", ""), "model": f"{SIZE.layers}x{SIZE.hidden}",
        "requests": N_REQUESTS, "max_batch_size": BATCH, "src_len": SRC, "budget": BUDGET, "rounds": ROUNDS,
        "tokens_generated": tokens, "budget_tokens": sum(budgets),
        "engine_mean_rows_per_step": round(stats.mean_rows_per_step, 2),
        **{f"{k}_s": v for k, v in med.items()},
        **{f"{k}_req_per_s": N_REQUESTS / v for k, v in med.items()},
        **{f"{k}_tok_per_s": tokens / v for k, v in med.items()},
        "engine_vs_static": ratio["static"], "engine_vs_transformers": ratio["transformers"],
        "outputs_equal_static": sum(a == b for a, b in zip(got, first["static"])) / N_REQUESTS,
        "outputs_equal_transformers": sum(a == b for a, b in zip(got, first["transformers"])) / N_REQUESTS,
    }
    benchmark.extra_info.update(info)
    print(f"\nengine benchmark: {N_REQUESTS} requests, src {SRC[0]}-{SRC[1]}, budgets {BUDGET[0]}-{BUDGET[1]}, "
          f"{tokens} tokens, batch {BATCH}, model {info['model']}, {info['device']} {info['dtype']}, "
          f"median of {ROUNDS} rounds")
    for name in ("engine", "static", "transformers"):
        print(f"  {name:13s} {info[name + '_s']:8.2f} s  {info[name + '_req_per_s']:8.2f} req/s  "
              f"{info[name + '_tok_per_s']:9.1f} tok/s")
    print(f"  engine vs static batches {ratio['static']:.2f}x, vs transformers {ratio['transformers']:.2f}x "
          f"(median per-round ratios); outputs equal: static {info['outputs_equal_static']:.0%}, "
          f"transformers {info['outputs_equal_transformers']:.0%}")
    if DTYPE == torch.float32:
        assert got == first["static"], "the engine's outputs differ from static batches through model.generate"
