"""generate() of encdec_fast vs transformers' EncoderDecoderModel.generate (pytest-benchmark).

Same checkpoint, device, dtype and inputs for both; greedy and beam 4 at batch 1 and 8. The timed
function synchronises CUDA. Besides pytest-benchmark's own timing of each, the encdec_fast test times
both implementations alternately (so that load from other processes hits both alike) and reports that
ratio as the speedup. Greedy outputs must be token-identical to transformers' (in fp32; in
fp16/bf16 the first 8 new tokens, since different kernels may flip a near-tie later on). Each
encdec_fast row records its speedup over transformers in extra_info; conftest prints a table.

    pytest benchmarks/test_bench_generate.py            # ENCDEC_BENCH_DTYPE=fp32|fp16|bf16 to choose
"""

import statistics
import time
import warnings

import pytest
import torch

MODES = {"greedy": dict(), "beam4": dict(num_beams=4)}
CASES = [(mode, batch, impl) for mode in MODES for batch in (1, 8) for impl in ("transformers", "encdec_fast")]


def _run(model, ids, mask, new_tokens, kw):
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, **kw)
    if out.is_cuda:
        torch.cuda.synchronize()
    return out


def _interleaved_speedup(hf, ours, ids, mask, new_tokens, kw, rounds=5):
    """median(transformers time / encdec_fast time) over back-to-back pairs of runs."""
    ratios = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        _run(hf, ids, mask, new_tokens, kw)
        t1 = time.perf_counter()
        _run(ours, ids, mask, new_tokens, kw)
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(ratios)


@pytest.mark.parametrize("mode,batch,impl", CASES, ids=[f"{m}-b{b}-{i}" for m, b, i in CASES])
def test_bench_generate(benchmark, gen_bench, mode, batch, impl):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    size = gen_bench.size
    model = gen_bench.hf if impl == "transformers" else gen_bench.ours
    ids, mask = gen_bench.inputs(batch)
    kw = MODES[mode]
    benchmark.group = f"generate {mode} batch {batch}"
    _run(model, ids, mask, size.new_tokens, kw)  # warm-up (Triton compilation, allocator)
    out = benchmark.pedantic(_run, args=(model, ids, mask, size.new_tokens, kw), rounds=3, iterations=1)
    secs = benchmark.stats.stats.median
    gen_bench.rows[(mode, batch, impl)] = {"seconds": secs, "output": out.cpu()}
    new = out.shape[0] * (out.shape[1] - 1) if mode == "greedy" else batch * size.new_tokens
    benchmark.extra_info.update(impl=impl, mode=mode, batch=batch, seconds=secs, tokens_per_s=new / secs)
    if impl != "encdec_fast":
        return
    ref = gen_bench.rows.get((mode, batch, "transformers"))
    if ref is None:  # run alone (-k): time nothing, just get the reference output
        ref = {"seconds": float("nan"), "output": _run(gen_bench.hf, ids, mask, size.new_tokens, kw).cpu()}
    benchmark.extra_info["speedup_vs_transformers_separate_runs"] = ref["seconds"] / secs
    speedup = _interleaved_speedup(gen_bench.hf, gen_bench.ours, ids, mask, size.new_tokens, kw)
    benchmark.extra_info["speedup_vs_transformers"] = speedup
    gen_bench.rows[(mode, batch, impl)]["speedup"] = speedup
    benchmark.extra_info["tokens_equal"] = bool(ref["output"].shape == out.shape and torch.equal(ref["output"], out.cpu()))
    if mode == "greedy":
        a, b = ref["output"], out.cpu()
        if gen_bench.dtype == torch.float32:
            assert a.shape == b.shape and torch.equal(a, b), "greedy tokens differ from transformers'"
        else:
            assert torch.equal(a[:, :9], b[:, :9]), "greedy tokens differ from transformers' in the first 8 steps"
