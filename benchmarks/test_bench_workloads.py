"""W1-W4 for every provider on the same checkpoint and inputs (pytest-benchmark).

Prints a table at the end (tokens/s or sequences/s, ratio to transformers-sdpa, fraction of the
physical floor, warm-up cost), then for W4 the decode-step cross-attention bytes (real lengths vs
padded) and the encoder timed in alternating runs of encdec_fast and transformers-sdpa (both models
resident: the ratio least disturbed by a busy machine); with ENCDEC_BENCH_JSON=path it also writes
the rows as JSON, which benchmarks/gpu_report.py turns into RESULTS.md.

    ENCDEC_BENCH_SIZE=base pytest benchmarks/test_bench_workloads.py -k W4    # W4 at bert-base size on a CPU
"""

import time

import pytest
import torch
import workloads as W

# transformers-eager only where it finishes in reasonable time
CASES = [(w, p) for w in W.WORKLOADS for p in W.PROVIDERS
         if not (p == "transformers-eager" and w.name == "W2")]


@pytest.fixture(scope="module")
def bench_env(tmp_path_factory):
    env = {"tmp": tmp_path_factory, "paths": {}, "models": {}, "rows": [], "outputs": {},
           "ceilings": W.measure_bandwidth_and_flops(), "notes": []}
    yield env
    _report(env)


def _model(env, provider, name):
    """One (checkpoint, provider) resident at a time; each workload model's checkpoint is built once."""
    if name not in env["paths"]:
        env["paths"][name] = W.build_checkpoint(str(env["tmp"].mktemp(f"bench_{name}")), name)
    if (name, provider) not in env["models"]:
        env["models"].clear()
        if W.CUDA:
            torch.cuda.empty_cache()
        env["models"][name, provider] = W.load_provider(env["paths"][name], provider)
    return env["models"][name, provider]


@pytest.mark.parametrize("w,provider", CASES, ids=[f"{w.label}-{p}" for w, p in CASES])
def test_workload(benchmark, bench_env, w, provider):
    model = _model(bench_env, provider, w.model)
    ids, mask = W.inputs(w, W.input_vocab(w.model))
    t0 = time.perf_counter()
    out = W.run_once(model, provider, w, ids, mask)  # warm-up: Triton compilation, CUDA-graph capture
    warm = time.perf_counter() - t0
    rounds = 3 if W.CUDA else 2
    out = benchmark.pedantic(W.run_once, args=(model, provider, w, ids, mask), rounds=rounds, iterations=1)
    secs = benchmark.stats.stats.median
    work = w.batch * (w.new_tokens if not w.encoder_only else 1)
    row = dict(workload=w.label, provider=provider, seconds=secs, per_s=work / secs,
               unit="seq/s" if w.encoder_only else "tok/s", warmup_s=warm)
    if not w.encoder_only:
        bench_env["outputs"][(w.label, provider)] = out.cpu()
    if bench_env["ceilings"]:
        g = model.net if provider.startswith("encdec_fast") else None
        bytes_per = torch.finfo(W.DTYPE).bits // 8
        if g is not None:
            enc_b = sum(b.numel() for b in g.encoder.buffers()) * bytes_per
            dec_b = sum(b.numel() for b in g.decoder.buffers()) * bytes_per
        else:
            enc_b = sum(p.numel() for p in model.encoder.parameters()) * bytes_per
            dec_b = sum(p.numel() for p in model.decoder.parameters()) * bytes_per
        floor = W.floor_seconds(w, bench_env["ceilings"], enc_b, dec_b, bytes_per, mask.sum(1).tolist())
        row["floor_frac"] = floor / secs
    benchmark.extra_info.update(row)
    bench_env["rows"].append(row)


W4_ENCODER = [w for w in W.WORKLOADS if w.name == "W4" and w.encoder_only]


@pytest.mark.parametrize("w", W4_ENCODER, ids=[w.label for w in W4_ENCODER])
def test_w4_encoder_alternating_with_transformers(bench_env, w):
    """encdec_fast (default backend) and transformers-sdpa resident together, timed in alternating
    rounds on W4's encoder; also the decode-step cross-attention bytes at W4's real vs padded lengths."""
    import transformers as T

    import encdec_fast

    bench_env["models"].clear()
    _model(bench_env, "transformers-sdpa", w.model)  # builds the checkpoint once
    bench_env["models"].clear()
    path = bench_env["paths"][w.model]
    ours = encdec_fast.load(path, device=W.DEVICE, dtype=W.DTYPE)
    hf = T.EncoderDecoderModel.from_pretrained(path, attn_implementation="sdpa", dtype=W.DTYPE)
    hf = hf.to(W.DEVICE).eval()
    ids, mask = W.inputs(w, W.input_vocab(w.model))
    sides = {"encdec_fast": (ours, "encdec_fast-" + ours.backend), "transformers-sdpa": (hf, "transformers-sdpa")}
    times = {name: [] for name in sides}
    outs = {name: W.run_once(m, p, w, ids, mask) for name, (m, p) in sides.items()}  # warm-up
    for _ in range(5 if W.CUDA else 4):
        for name, (m, p) in sides.items():
            t0 = time.perf_counter()
            W.run_once(m, p, w, ids, mask)
            times[name].append(time.perf_counter() - t0)
    med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    real = mask.bool()
    err = ((outs["encdec_fast"] - outs["transformers-sdpa"]).abs()[real].max()
           / outs["transformers-sdpa"].abs()[real].max()).item()
    lengths = mask.sum(1).tolist()
    bytes_per = torch.finfo(W.DTYPE).bits // 8
    packed, padded = W.cross_kv_bytes(lengths, bytes_per), W.cross_kv_bytes(lengths, bytes_per, ids.shape[1])
    bench_env["notes"] += [
        f"{w.label}, alternating runs (median of {len(times['encdec_fast'])}): encdec_fast {med['encdec_fast']:.4f} s, "
        f"transformers-sdpa {med['transformers-sdpa']:.4f} s -> {med['transformers-sdpa'] / med['encdec_fast']:.2f}x; "
        f"real tokens {sum(lengths)} of {ids.numel()} padded; max rel err at real positions {err:.2e}",
        f"{w.label}, decode-step cross-attention K/V bytes ({W.MODELS[w.model][0]} layers x {W.MODELS[w.model][1]}, "
        f"{str(W.DTYPE).replace('torch.', '')}): real lengths {packed / 1e6:.1f} MB, padded to {ids.shape[1]} "
        f"{padded / 1e6:.1f} MB ({packed / padded:.2f}x)",
    ]
    assert err < (1e-4 if W.DTYPE == torch.float32 else 5e-2)


def _report(env):
    rows = env["rows"]
    base = {r["workload"]: r["seconds"] for r in rows if r["provider"] == "transformers-sdpa"}
    for r in rows:
        if r["workload"] in base:
            r["speedup_vs_transformers_sdpa"] = base[r["workload"]] / r["seconds"]
        ref = env["outputs"].get((r["workload"], "transformers-sdpa"))
        out = env["outputs"].get((r["workload"], r["provider"]))
        if ref is not None and out is not None and ref.shape == out.shape:
            r["tokens_equal_to_transformers_sdpa"] = float((ref == out).float().mean())
    env["ceilings"] and rows.append({"ceilings": env["ceilings"]})
    W.save_results(rows)
    print("\n\n| workload | provider | rate | vs transformers-sdpa | floor fraction | warm-up s | tokens = sdpa |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "workload" not in r:
            continue
        print(f"| {r['workload']} | {r['provider']} | {r['per_s']:.1f} {r['unit']} | "
              f"{r.get('speedup_vs_transformers_sdpa', float('nan')):.2f}x | {r.get('floor_frac', float('nan')):.2f} | "
              f"{r['warmup_s']:.2f} | {r.get('tokens_equal_to_transformers_sdpa', float('nan')):.3f} |")
    if env["ceilings"]:
        print(f"ceilings: {env['ceilings']}")
    for note in env["notes"]:
        print(f"note: {note}")
