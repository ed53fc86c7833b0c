"""HTTP serving vs the Engine alone: `encdec-fast serve` in a subprocess, 64 clients in a
closed loop over HTTP, against the same Engine in this process fed by 64 clients in a closed loop,
and against engine.generate() with every request at once. Same checkpoint, device, dtype and
requests (test_bench_engine.py's mixed workload: sources 8-512 tokens, budgets 4-128, greedy).

A closed loop: each client sends its next request when its previous answer arrives, so at most 64
requests are in the engine at once. The HTTP clients (httpx, asyncio) run in this process, on the
same cores as the server. Reported: generated tokens/s of each, the server's share of the Engine's,
and per-request latency p50/p99 (client side, from send to the last byte). Every answer must equal the
Engine's (fp32). Rounds alternate the three (load from other processes then hits all alike); medians.

    pytest benchmarks/test_bench_serve.py -s       (ENCDEC_BENCH_SERVE_N requests, default 128 on a CPU)
"""

import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
from conftest import CUDA, build_bert2gpt2
from conftest import GEN_DEVICE as DEVICE
from conftest import GEN_DTYPE as DTYPE
from test_bench_engine import SIZE, mixed_workload

httpx = pytest.importorskip("httpx", reason="pip install -e '.[test]'")

N_REQUESTS = int(os.environ.get("ENCDEC_BENCH_SERVE_N", 512 if CUDA else 128))
CLIENTS = 64
BATCH = 64
ROUNDS = int(os.environ.get("ENCDEC_BENCH_SERVE_ROUNDS", 2))


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def closed_loop(send, n: int):
    """CLIENTS coroutines take request indices in turn; -> (outputs by index, latencies, wall seconds)."""
    outputs, latencies, next_i = [None] * n, [], iter(range(n))

    async def client():
        for i in next_i:
            t0 = time.perf_counter()
            outputs[i] = await send(i)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return outputs, latencies, time.perf_counter() - t0


def run_http(base, inputs, budgets):
    async def main():
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
            async def send(i):
                r = await client.post("/v1/generate", json={"input": inputs[i], "max_new_tokens": budgets[i]})
                r.raise_for_status()
                return r.json()["output_ids"]

            return await closed_loop(send, len(inputs))

    return asyncio.run(main())


def run_engine_clients(engine, inputs, budgets):
    """The same closed loop against engine.submit, from an event loop in a second thread while this
    thread drives the engine (as the server's threads do)."""
    box, done = {}, threading.Event()

    def clients():
        async def send(i):
            return (await asyncio.wrap_future(engine.submit(inputs[i], max_new_tokens=budgets[i]))).output_ids

        try:
            box["out"] = asyncio.run(closed_loop(send, len(inputs)))
        finally:
            done.set()

    threading.Thread(target=clients).start()
    engine.drive(until=done.is_set)
    return box["out"]


def run_engine_generate(engine, inputs, budgets):
    t0 = time.perf_counter()
    res = engine.generate(inputs, request_kwargs=[{"max_new_tokens": b} for b in budgets])
    return [r.output_ids for r in res], [], time.perf_counter() - t0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The benchmark checkpoint, a model in this process, and `encdec-fast serve` on it in a subprocess."""
    import socket

    import encdec_fast

    path = build_bert2gpt2(str(tmp_path_factory.mktemp("serve_bench")), SIZE)
    model = encdec_fast.load(path, device=DEVICE, dtype=DTYPE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dtype = str(DTYPE).replace("torch.", "")
    log = open(tmp_path_factory.mktemp("serve_log") / "serve.log", "w+")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "encdec_fast.cli", "serve", path, "--port", str(port), "--device",
                             str(DEVICE), "--dtype", dtype, "--max-batch-size", str(BATCH), "--max-queued", "1024",
                             "--request-timeout", "3600", "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, open(log.name).read()
            assert time.monotonic() - t0 < 300, "the server did not get ready"
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield model, base
    finally:
        proc.terminate()
        proc.wait(120)
        log.close()


def test_bench_http_vs_engine(benchmark, served):
    import encdec_fast

    warnings.filterwarnings("ignore")
    model, base = served
    inputs, budgets = mixed_workload(N_REQUESTS, SIZE.enc_vocab)
    warm_in, warm_b = mixed_workload(8, SIZE.enc_vocab, seed=1)
    runs = {"http": [], "engine_clients": [], "engine_generate": []}
    with encdec_fast.Engine(model, max_batch_size=BATCH) as engine:
        run_http(base, warm_in, warm_b)  # warm-up: first calls, buffer growth, on both sides
        run_engine_clients(engine, warm_in, warm_b)
        for r in range(ROUNDS):
            if r == 0:
                runs["http"].append(benchmark.pedantic(run_http, args=(base, inputs, budgets), rounds=1, iterations=1))
            else:
                runs["http"].append(run_http(base, inputs, budgets))
            runs["engine_clients"].append(run_engine_clients(engine, inputs, budgets))
            runs["engine_generate"].append(run_engine_generate(engine, inputs, budgets))

    ref = runs["engine_generate"][0][0]
    tokens = sum(len(o) - 1 for o in ref)
    info = {"device": str(DEVICE), "dtype": str(DTYPE).replace("torch.", ""), "model": f"{SIZE.layers}x{SIZE.hidden}",
            "requests": N_REQUESTS, "clients": CLIENTS, "max_batch_size": BATCH, "rounds": ROUNDS,
            "tokens_generated": tokens}
    for name, rs in runs.items():
        info[f"{name}_tok_per_s_rounds"] = [round(tokens / wall, 1) for _, _, wall in rs]
        info[f"{name}_tok_per_s"] = statistics.median(tokens / wall for _, _, wall in rs)
        lat = [x for _, lats, _ in rs for x in lats]
        if lat:
            info[f"{name}_p50_s"], info[f"{name}_p99_s"] = percentile(lat, 50), percentile(lat, 99)
        info[f"{name}_outputs_equal"] = all(out == ref for out, _, _ in rs)
    for base_name in ("engine_clients", "engine_generate"):  # per-round ratios, then their median
        info[f"http_vs_{base_name}"] = statistics.median(
            b[2] / h[2] for h, b in zip(runs["http"], runs[base_name]))
    benchmark.extra_info.update(info)
    print(f"\nserving benchmark: {N_REQUESTS} requests, {CLIENTS} clients in a closed loop, {tokens} tokens, "
          f"model {info['model']}, {info['device']} {info['dtype']}, median of {ROUNDS} rounds")
    for name in runs:
        lat = (f"  p50 {info[name + '_p50_s']:.3f} s  p99 {info[name + '_p99_s']:.3f} s"
               if name + "_p50_s" in info else "")
        print(f"  {name:16s} {info[name + '_tok_per_s']:9.1f} tok/s{lat}  (rounds: {info[name + '_tok_per_s_rounds']})")
    print(f"  HTTP / engine with {CLIENTS} clients: {info['http_vs_engine_clients']:.2f}; "
          f"HTTP / engine.generate: {info['http_vs_engine_generate']:.2f}")
    if DTYPE == torch.float32:
        assert info["http_outputs_equal"] and info["engine_clients_outputs_equal"], "outputs differ from the engine's"
