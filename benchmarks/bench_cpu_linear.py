"""A decode step's projections on the CPU, every product torch ships against encdec_fast's kernels: ms per step.

    python benchmarks/bench_cpu_linear.py [--rows 1,8,32,128] [--impls f32,bf16,...] [--threads 2] [--rounds 7]

The 73 projections of one bert-base + gpt2 decode step (12 GPT-2 layers: QKV, O + residual, cross Q, cross O +
residual, fc1 + GELU, fc2 + residual; the 768 -> 50257 LM head), each with its own weights (out of cache, as in a
real step), timed alternately; median and best of the rounds. Weight bytes per step: fp32 552 MB, bf16 276 MB,
int8 138 MB + 9 MB of fp16 group scales (the floor at this machine's ~30 GB/s: 18, 9 and 4.9 ms).

  f32 / bf16        oneDNN's packed linear (prepack.py): bias, GELU, residual fused; bf16 in, bf16 out
  onednn_a8w8       oneDNN's qlinear_pointwise: activations quantised to uint8 per call in torch ops around it
  fbgemm            quantized.linear_dynamic: activations quantised per call inside it, fp32 out
  woq_int8pack      aten._weight_int8pack_mm (bf16 activations, int8 weights)
  cpu_int8 / cpu_bf16 / cpu_f32  encdec_fast/cpu/kernels.py: int8 (int16 activations) / bf16 / fp32 weights, fp32
                    activations in and out
"""

import argparse
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")
E, V = 768, 50257


def build():
    from encdec_fast.cpu import kernels as ck

    shapes = []
    for _ in range(12):
        shapes += [(E, 3 * E, None), (E, E, "res"), (E, E, None), (E, E, "res"), (E, 4 * E, "gelu"), (4 * E, E, "res")]
    shapes.append((E, V, None))
    layers = []
    for K, N, post in shapes:
        w = torch.randn(N, K) * 0.02
        b = torch.randn(N) * 0.02
        scale = w.abs().amax(1) / 127
        wq = torch.round(w / scale[:, None]).to(torch.int8)
        d = dict(K=K, N=N, post=post, b=b, bb=b.bfloat16(), scale=scale, sb=scale.bfloat16(),
                 f32=torch.ops.mkldnn._reorder_linear_weight(w, 8), bf16=torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), 8),
                 onednn=torch.ops.onednn.qlinear_prepack(wq, None), zp=torch.zeros(N, dtype=torch.int64),
                 fb=torch.ops.quantized.linear_prepack(torch.quantize_per_channel(w, scale.double(), torch.zeros(N, dtype=torch.long), 0, torch.qint8), b),
                 wq=wq)
        if ck.library() is not None:
            from encdec_fast.cpu import weights as lowp

            w8 = lowp.to_int8(w)  # int8 with fp16 scales per 32 inputs (load(quantize="int8")'s format)
            d.update(ci8=w8.values, csc=w8.scale,
                     cbf=ck.pack(w.bfloat16()) if ck.has_bf16() else None, cf32=ck.pack(w))
        layers.append(d)
    return layers


def run_onednn_f(layers, M, dt, key):
    x = torch.randn(M, E, dtype=dt)
    h = torch.randn(M, 4 * E, dtype=dt)
    for d in layers:
        inp = h if d["K"] == 4 * E else x
        bias = d["b"] if dt == torch.float32 else d["bb"]
        if d["post"] == "res":
            torch.ops.mkldnn._linear_pointwise.binary(inp, x, d[key], bias, "add")
        elif d["post"] == "gelu":
            torch.ops.mkldnn._linear_pointwise(inp, d[key], bias, "gelu", [], "tanh")
        else:
            torch.ops.mkldnn._linear_pointwise(inp, d[key], bias, "none", [], "")


def run_onednn_a8w8(layers, M):
    x = torch.randn(M, E)
    h = torch.randn(M, 4 * E)
    for d in layers:
        inp = h if d["K"] == 4 * E else x
        s = float(inp.abs().amax() / 127)
        q = torch.round(inp / s).add_(128).clamp_(0, 255).to(torch.uint8)
        if d["post"] == "res":
            torch.ops.onednn.qlinear_pointwise.binary(q, s, 128, d["onednn"], d["scale"], d["zp"], x, d["b"], 1.0, 0,
                                                      torch.float32, 1.0, 0, "add", 1.0, "none", [], "")
        else:
            torch.ops.onednn.qlinear_pointwise(q, s, 128, d["onednn"], d["scale"], d["zp"], d["b"], 1.0, 0, torch.float32,
                                               d["post"] or "none", [], "tanh" if d["post"] else "")


def run_fbgemm(layers, M):
    x = torch.randn(M, E)
    h = torch.randn(M, 4 * E)
    for d in layers:
        inp = h if d["K"] == 4 * E else x
        y = torch.ops.quantized.linear_dynamic(inp, d["fb"], False)
        if d["post"] == "res":
            y += x
        elif d["post"] == "gelu":
            torch.nn.functional.gelu(y, approximate="tanh")


def run_woq(layers, M):
    x = torch.randn(M, E, dtype=torch.bfloat16)
    h = torch.randn(M, 4 * E, dtype=torch.bfloat16)
    for d in layers:
        torch.ops.aten._weight_int8pack_mm(h if d["K"] == 4 * E else x, d["wq"], d["sb"])


def run_cpu(layers, M, key):
    from encdec_fast.cpu import kernels as ck

    x = torch.randn(M, E)
    h = torch.randn(M, 4 * E)
    for d in layers:
        inp = h if d["K"] == 4 * E else x
        ck.linear(inp, d[key], d["N"], d["csc"] if key == "ci8" else None, d["b"], x if d["post"] == "res" else None,
                  gelu="tanh" if d["post"] == "gelu" else None)


IMPLS = {
    "f32": lambda L, M: run_onednn_f(L, M, torch.float32, "f32"),
    "bf16": lambda L, M: run_onednn_f(L, M, torch.bfloat16, "bf16"),
    "onednn_a8w8": run_onednn_a8w8,
    "fbgemm": run_fbgemm,
    "woq_int8pack": run_woq,
    "cpu_int8": lambda L, M: run_cpu(L, M, "ci8"),
    "cpu_bf16": lambda L, M: run_cpu(L, M, "cbf"),
    "cpu_f32": lambda L, M: run_cpu(L, M, "cf32"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--impls", default="f32,bf16,onednn_a8w8,fbgemm,cpu_int8,cpu_bf16,cpu_f32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    layers = build()
    names = a.impls.split(",")
    for M in (int(m) for m in a.rows.split(",")):
        times = {k: [] for k in names}
        for k in names:
            IMPLS[k](layers, M)
        for _ in range(a.rounds):
            for k in names:
                t0 = time.perf_counter()
                IMPLS[k](layers, M)
                times[k].append(time.perf_counter() - t0)
        print(f"rows {M}: " + "  ".join(f"{k} {statistics.median(v) * 1e3:.2f} ms (best {min(v) * 1e3:.2f})"
                                       for k, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
