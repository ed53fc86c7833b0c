"""Where does a W1 decode step's time go? (CUDA only)

    python benchmarks/profile_step.py [--batch 1] [--src 512] [--steps 128]

Prints: the time per generated token of generate(); the replay time of the captured decode-step
graph alone (GPU work of the step); the difference (host loop: processors, token choice, copies);
and the top kernels of one eager step by CUDA time (torch.profiler).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import workloads as W  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--src", type=int, default=512)
    ap.add_argument("--steps", type=int, default=128)
    a = ap.parse_args()
    import encdec_fast
    from encdec_fast.decode import step as step_fn

    with tempfile.TemporaryDirectory() as d:
        W.build_checkpoint(d)
        m = encdec_fast.load(d, device="cuda", dtype=torch.bfloat16)
    w = W.Workload("P", a.batch, a.src, a.steps)
    ids, mask = W.inputs(w, 30522)
    kw = dict(attention_mask=mask, max_new_tokens=a.steps, min_new_tokens=a.steps, do_sample=False)
    m.generate(ids, **kw)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        m.generate(ids, **kw)
    torch.cuda.synchronize()
    per_tok = (time.perf_counter() - t0) / 3 / a.steps
    runner = next(iter(m.state_cache.entries.values()))  # the StepRunner generate() used, with its graphs
    (plan, _), (graph, _) = next(iter(runner.graphs.items()))  # the whole step: decoder, processors, choice, commit
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        graph.replay()
    torch.cuda.synchronize()
    replay = (time.perf_counter() - t0) / 200
    print(f"generate: {per_tok * 1e3:.3f} ms/token; graph replay alone: {replay * 1e3:.3f} ms; "
          f"host loop and rest: {(per_tok - replay) * 1e3:.3f} ms")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # the step's kernels, eagerly (one row per kernel)
        for _ in range(5):
            step_fn.commit(runner.state, plan, step_fn.forward(runner.state, plan))
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    kernels = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA") / 5
    print(f"kernels per step: {kernels:.0f}")
    m.cuda_graphs = False
    m.generate(ids, **kw)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    m.generate(ids, **kw)
    torch.cuda.synchronize()
    print(f"without CUDA graphs: {(time.perf_counter() - t0) / a.steps * 1e3:.3f} ms/token")


if __name__ == "__main__":
    main()
