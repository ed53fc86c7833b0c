"""Ray Data batch generation: encdec_fast.ray.generate_dataset on a local Ray with 1 and 2
actors, against engine.generate() in this process on the same rows (sources of test_bench_engine.py's
mixed workload, 8-512 tokens; one budget for every row, NEW_TOKENS, greedy, the checkpoint's eos:
generate_dataset takes one set of generate arguments per job). Reported: generated tokens/s over the job's
wall time (actor start and model load included, as a user of a batch job sees it) and the outputs'
agreement with the Engine's (fp32: must be equal).

Ray runs its CPU actors on one thread each (it sets OMP_NUM_THREADS to the actor's CPUs), so 2 actors
use 2 cores; the Engine in this process uses torch's threads. On a GPU each actor takes a whole GPU,
and 2 actors need 2 GPUs.

    pytest benchmarks/test_bench_ray.py -s       (ENCDEC_BENCH_RAY_N rows, default 128 on a CPU)
"""

import os
import time
import warnings

import pytest
import torch
from conftest import CUDA, build_bert2gpt2
from conftest import GEN_DEVICE as DEVICE
from conftest import GEN_DTYPE as DTYPE
from test_bench_engine import SIZE, mixed_workload

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # single-node mode: Ray on 127.0.0.1 only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray", reason="pip install -e '.[test]'")

N_ROWS = int(os.environ.get("ENCDEC_BENCH_RAY_N", 2048 if CUDA else 128))
ACTORS = [1, 2] if not CUDA else sorted({1, min(2, torch.cuda.device_count())})
NEW_TOKENS = 64


def test_bench_ray_data_actors(benchmark, tmp_path_factory):
    import encdec_fast
    import encdec_fast.ray as edr

    warnings.filterwarnings("ignore")
    path = build_bert2gpt2(str(tmp_path_factory.mktemp("ray_bench")), SIZE)
    inputs, _ = mixed_workload(N_ROWS, SIZE.enc_vocab)
    dtype = str(DTYPE).replace("torch.", "")
    model = encdec_fast.load(path, device=DEVICE, dtype=DTYPE)
    with encdec_fast.Engine(model, max_batch_size=64) as engine:
        engine.generate(inputs[:4], max_new_tokens=4)
        t0 = time.perf_counter()
        ref = engine.generate(inputs, max_new_tokens=NEW_TOKENS)
        engine_wall = time.perf_counter() - t0
    tokens = sum(r.num_generated for r in ref)

    rows = [{"id": i, "input": x} for i, x in enumerate(inputs)]
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {}
    try:
        for actors in ACTORS:
            def job(actors=actors):
                ds = ray.data.from_items(rows)
                out = edr.generate_dataset(ds, path, num_actors=actors, num_gpus=1 if CUDA else 0, batch_size=16,
                                           max_batch_size=64, device=str(DEVICE), dtype=dtype,
                                           max_new_tokens=NEW_TOKENS)
                return out.take_all()

            t0 = time.perf_counter()
            out = benchmark.pedantic(job, rounds=1, iterations=1) if actors == 1 else job()
            results[actors] = (out, time.perf_counter() - t0)
    finally:
        ray.shutdown()

    info = {"device": str(DEVICE), "dtype": dtype, "model": f"{SIZE.layers}x{SIZE.hidden}", "rows": N_ROWS,
            "engine_tok_per_s": tokens / engine_wall, "torch_threads": torch.get_num_threads()}
    print(f"\nRay Data benchmark: {N_ROWS} rows, model {info['model']}, {info['device']} {dtype}")
    print(f"  engine.generate in-process   {info['engine_tok_per_s']:9.1f} tok/s  ({tokens} tokens, "
          f"{info['torch_threads']} torch threads)")
    for actors, (out, wall) in results.items():
        got = {r["id"]: r for r in out}
        job_tokens = sum(r["num_generated"] for r in got.values())
        equal = all(list(got[i]["output_ids"]) == ref[i].output_ids for i in range(N_ROWS))
        info[f"ray_{actors}_actors_tok_per_s"] = job_tokens / wall
        info[f"ray_{actors}_actors_wall_s"] = wall
        info[f"ray_{actors}_actors_outputs_equal"] = equal
        print(f"  Ray Data, {actors} actor(s)        {job_tokens / wall:9.1f} tok/s  ({job_tokens} tokens in "
              f"{wall:.1f} s, actor start included); outputs equal the engine's: {equal}")
        if DTYPE == torch.float32:
            assert equal, "Ray Data outputs differ from the engine's"
    benchmark.extra_info.update(info)
