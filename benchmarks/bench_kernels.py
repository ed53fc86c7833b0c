"""Kernel timings: our Triton and CUDA C++ (csrc/) kernels vs PyTorch on bert-base-like shapes, fp16 and bf16.

    python benchmarks/bench_kernels.py                    # prints a markdown table (needs CUDA)
    python benchmarks/bench_kernels.py --out kernels.md   # also writes it to a file
    python benchmarks/bench_kernels.py --csrc-only        # only the csrc rows
    python benchmarks/bench_kernels.py --quick            # tiny shapes: a smoke run (CPU: interpreter)
    python benchmarks/bench_kernels.py --tiles            # attention tile sweep per head dim 64/80/128

csrc rows (when the library builds and finds the GPU; ENCDEC_CUDA=0 leaves them out): greedy and beam
selection (processors fused) on fp32 logits against decode/select.py's processors + argmax / topk. Their
GB/s is also given as a fraction of the measured device-to-device copy rate ("of copy").

Each row times one op with ``triton.testing.do_bench`` (median, L2 flushed between runs) for ours
and for the PyTorch baseline (SDPA for attention, SDPA over the cache for decode, F.layer_norm,
F.gelu; SDPA over the padded batch with a key mask for the packed varlen kernel), reports TFLOP/s
(attention: 4*B*H*Lq*Lk*D, halved for causal; varlen: 4*H*D*sum(L^2), real tokens only) or GB/s (bytes that must
move: inputs read + outputs written, shared K/V rows counted once), and the max abs error of both
against an fp32 reference computed with ``encdec_fast.ops`` on the same rounded inputs.
Decode rows use full caches (lens = Lmax, the last key written by the call) so both sides do the same
work, at 1, 64 and 256 rows; their GB/s is also given as a fraction of the measured device-to-device
copy rate (the bandwidth target: >= 70% at 64 and 256 rows). fused_linear rows (decode-sized GEMVs
with their LayerNorm/GELU/residual neighbours) count the weight bytes. Not a pytest file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class Case:
    op: str
    shape: str
    ours: Callable[[], torch.Tensor]
    torch_: Callable[[], torch.Tensor]
    ref32: Callable[[], torch.Tensor]
    unit: str  # "TFLOP/s" or "GB/s"
    work: float  # FLOPs or bytes per call
    torch_as_ref: Callable = lambda t: t  # noqa: E731  torch's output in ref32's layout (for its error)


def _first(t):
    return t[0] if isinstance(t, tuple) else t


def _bench(fn) -> float:
    """Median milliseconds per call."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(3):  # CPU smoke run only: the numbers mean nothing
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[1]


def _padding_mask(B, L, device):
    """bool [B, L], True = attend: row b keeps a length between L/2 and L."""
    lens = torch.linspace(L, L // 2, B, device=device).long()
    return torch.arange(L, device=device)[None, :] < lens[:, None]


def attention_cases(dt, dev, B, L, H, D) -> list[Case]:
    from encdec_fast import ops
    from encdec_fast.kernels import attention as katt

    qkv = torch.randn(B, L, 3, H, D, device=dev, dtype=dt)  # fused projection, as in the model
    q, k, v = qkv.unbind(2)  # (B, L, H, D) strided views
    q32, k32, v32 = q.float(), k.float(), v.float()
    mask = _padding_mask(B, L, dev)
    s = D ** -0.5
    t = lambda x: x.transpose(1, 2)  # noqa: E731  (B, L, H, D) <-> (B, H, L, D)

    def sdpa(causal=False, m=None):
        return lambda: t(F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=m, is_causal=causal,
                                                        scale=s)).contiguous()

    flops = 4.0 * B * H * L * L * D
    shape = f"B={B} L={L} H={H} D={D}"
    return [
        Case("attention (encoder, no mask)", shape, lambda: katt.attention(q, k, v, scale=s), sdpa(),
             lambda: ops.attention(q32, k32, v32, scale=s), "TFLOP/s", flops),
        Case("attention (encoder, key padding)", shape, lambda: katt.attention(q, k, v, scale=s, key_mask=mask),
             sdpa(m=mask[:, None, None, :]), lambda: ops.attention(q32, k32, v32, scale=s, key_mask=mask),
             "TFLOP/s", flops),
        Case("attention (causal prefill)", shape, lambda: katt.attention(q, k, v, scale=s, causal=True),
             sdpa(causal=True), lambda: ops.attention(q32, k32, v32, scale=s, causal=True), "TFLOP/s", flops / 2),
    ]


def w4_lengths(B: int, L: int) -> list[int]:
    """W4's source lengths: uniform in [L/16, L] (32-512 at L=512), seeded."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(max(1, L // 16), L + 1, (B,), generator=g).tolist()


def varlen_cases(dt, dev, lengths, H, D, tiles=None) -> list[Case]:
    """The packed encoder's attention (varlen kernel) vs SDPA over the same sequences padded to the
    longest with a key mask (what an encoder without packing runs)."""
    from encdec_fast import ops
    from encdec_fast.kernels import attention as katt

    B, S, T = len(lengths), max(lengths), sum(lengths)
    qkv = torch.randn(T, 3, H, D, device=dev, dtype=dt)
    q, k, v = qkv.unbind(1)  # (T, H, D) strided views
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    mask = torch.arange(S, device=dev)[None, :] < torch.tensor(lengths, device=dev)[:, None]  # (B, S)
    index = mask.flatten().nonzero().squeeze(1)
    padded = [torch.zeros(B * S, H, D, device=dev, dtype=dt).index_copy_(0, index, t).view(B, S, H, D).transpose(1, 2)
              for t in (q, k, v)]  # (B, H, S, D)
    s = D ** -0.5
    kw = dict(cu_seqlens=cu, max_seqlen=S, scale=s)

    def sdpa():
        return F.scaled_dot_product_attention(*padded, attn_mask=mask[:, None, None, :], scale=s)  # (B, H, S, D)

    flops = 4.0 * H * D * sum(n * n for n in lengths)
    return [Case("varlen attention (packed encoder)", f"{B} seqs, {T} of {B * S} tokens H={H} D={D}",
                 lambda: katt.varlen_attention(q, k, v, tiles=tiles, **kw), sdpa,
                 lambda: ops.varlen_attention(q.float(), k.float(), v.float(), **kw), "TFLOP/s", flops,
                 torch_as_ref=lambda o: o.transpose(1, 2).flatten(0, 1).index_select(0, index))]


def decode_cases(dt, dev, N, L, H, D, *, cross: bool, beams: int = 1) -> list[Case]:
    """Packed decode attention. Self: N rows over their (N, L) cache, the new K/V written by the
    kernel at slot L-1 (torch: index_put into the cache, then SDPA over it). Cross: N rows, `beams`
    per request, over N/beams padded encoder rows of L keys with a padding mask, beams sharing their
    request's window (torch: gather each row's K/V, then SDPA)."""
    from encdec_fast import ops
    from encdec_fast.kernels import decode_attention as kdec

    B = N // beams if cross else N  # K/V rows that must be read
    q = torch.randn(N, H, D, device=dev, dtype=dt)
    k = torch.randn(B, L, H, D, device=dev, dtype=dt)
    v = torch.randn(B, L, H, D, device=dev, dtype=dt)
    kf, vf = k.view(B * L, H, D), v.view(B * L, H, D)  # key rows
    lens = torch.full((N,), L, dtype=torch.int32, device=dev)
    row = torch.arange(N, device=dev) // beams if cross else torch.arange(N, device=dev)
    starts = (row * L).to(torch.int32)
    key_mask = _padding_mask(B, L, dev) if cross else None
    k_new = None if cross else torch.randn(N, H, D, device=dev, dtype=dt)
    v_new = None if cross else torch.randn(N, H, D, device=dev, dtype=dt)
    s = D ** -0.5
    kw = dict(scale=s, starts=starts, lens=lens, key_mask=None if key_mask is None else key_mask.reshape(-1),
              k_new=k_new, v_new=v_new, max_len=L)
    q32, kf32, vf32 = q.float(), kf.float(), vf.float()
    new32 = {} if cross else dict(k_new=k_new.float(), v_new=v_new.float())

    def torch_decode():  # plain torch: write the cache / gather rows, SDPA with one query over them
        if cross:
            kk, vv, visible = k[row], v[row], key_mask[row]
        else:
            k[row, L - 1], v[row, L - 1] = k_new, v_new
            kk, vv, visible = k, v, None
        o = F.scaled_dot_product_attention(q[:, :, None], kk.transpose(1, 2), vv.transpose(1, 2),
                                           attn_mask=None if visible is None else visible[:, None, None, :], scale=s)
        return o[:, :, 0]

    elt = q.element_size()
    nbytes = (2 * B * L * H * D + (2 if cross else 4) * N * H * D) * elt  # K/V once, q and out (+ new K/V)
    name = ("decode self-attention (+ cache write)" if not cross else
            f"decode cross-attention ({beams} beams share K/V)" if beams > 1 else "decode cross-attention (own K/V)")
    shape = f"N={N} rows over {B}x{L} H={H} D={D}"
    return [Case(name, shape, lambda: kdec.decode_attention(q, kf, vf, **kw), torch_decode,
                 lambda: ops.decode_attention(q32, kf32, vf32, **(kw | new32)), "GB/s", nbytes)]


def linear_cases(dt, dev, M, E, F_) -> list[Case]:
    """fused_linear at decode sizes (bert-base/gpt2: E=768, F_=3072) against the unfused torch chain."""
    from encdec_fast import ops
    from encdec_fast.kernels import linear as klin

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, device=dev, dtype=dt) * scale + shift

    ln_e = (rnd(E, scale=0.1, shift=1.0), rnd(E, scale=0.1), 1e-5)
    x, r = rnd(M, E), rnd(M, E)
    h = rnd(M, F_)
    w_qkv, b_qkv = rnd(3 * E, E, scale=E ** -0.5), rnd(3 * E, scale=0.1)
    w_fc1, b_fc1 = rnd(F_, E, scale=E ** -0.5), rnd(F_, scale=0.1)
    w_fc2, b_fc2 = rnd(E, F_, scale=F_ ** -0.5), rnd(E, scale=0.1)
    f32 = lambda t: tuple(f32(a) for a in t) if isinstance(t, tuple) else (  # noqa: E731
        t.float() if isinstance(t, torch.Tensor) else t)
    elt = x.element_size()
    cases = []
    for name, (xx, w, b, kw) in {
        "fused_linear LN+QKV": (x, w_qkv, b_qkv, dict(x_ln=ln_e)),
        "fused_linear LN+fc1+gelu(tanh)": (x, w_fc1, b_fc1, dict(x_ln=ln_e, gelu="tanh")),
        "fused_linear fc2+LN(residual) (BERT)": (h, w_fc2, b_fc2, dict(residual=r, residual_ln=ln_e)),
    }.items():
        nbytes = (w.numel() + b.numel() + xx.numel() + w.shape[0] * M * (2 if "residual" in kw else 1)) * elt
        cases.append(Case(name, f"M={M} {w.shape[1]}->{w.shape[0]}",
                          lambda xx=xx, w=w, b=b, kw=kw: klin.fused_linear(xx, w, b, **kw),
                          lambda xx=xx, w=w, b=b, kw=kw: ops.fused_linear(xx, w, b, **kw),
                          lambda xx=xx, w=w, b=b, kw=kw: ops.fused_linear(f32(xx), f32(w), f32(b),
                                                                            **{n: f32(a) for n, a in kw.items()}),
                          "GB/s", nbytes))
    return cases


def copy_rate(dev) -> float:
    """GB/s of a device-to-device copy of 512 MB (bytes read + written): the bandwidth yardstick."""
    n = (512 << 20) if dev == "cuda" else (1 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * n / (_bench(lambda: dst.copy_(src)) * 1e-3) / 1e9


def norm_act_cases(dt, dev, M, N_ln, N_mlp) -> list[Case]:
    from encdec_fast import ops
    from encdec_fast.kernels import activation as kact
    from encdec_fast.kernels import layer_norm as kln

    x = torch.randn(M, N_ln, device=dev, dtype=dt)
    r = torch.randn(M, N_ln, device=dev, dtype=dt)
    w = 1 + 0.1 * torch.randn(N_ln, device=dev, dtype=dt)
    b = 0.1 * torch.randn(N_ln, device=dev, dtype=dt)
    h = torch.randn(M, N_mlp, device=dev, dtype=dt)
    hb = torch.randn(N_mlp, device=dev, dtype=dt)
    f32 = lambda *ts: [t.float() for t in ts]  # noqa: E731
    elt = x.element_size()
    cases = [
        Case("layer_norm", f"{M}x{N_ln}", lambda: kln.layer_norm(x, w, b, 1e-12),
             lambda: F.layer_norm(x, (N_ln,), w, b, 1e-12),
             lambda: ops.layer_norm(*f32(x, w, b), 1e-12), "GB/s", 2 * M * N_ln * elt),
        Case("add_layer_norm (x + residual, LN)", f"{M}x{N_ln}", lambda: kln.add_layer_norm(x, r, w, b, 1e-5),
             lambda: ops.add_layer_norm(x, r, w, b, 1e-5),
             lambda: ops.add_layer_norm(*f32(x, r, w, b), 1e-5), "GB/s", 4 * M * N_ln * elt),
    ]
    for approx in ("none", "tanh"):
        cases.append(Case(f"bias_gelu ({approx})", f"{M}x{N_mlp}", lambda a=approx: kact.bias_gelu(h, hb, a),
                          lambda a=approx: F.gelu(h + hb, approximate=a),
                          lambda a=approx: ops.bias_gelu((h + hb).float(), None, a), "GB/s", 2 * M * N_mlp * elt))
    return cases


def csrc_available() -> str | None:
    """None when the csrc kernels can run here, else why not."""
    from encdec_fast import csrc
    from encdec_fast.errors import CudaKernelError

    if csrc.mode() == "0":
        return "ENCDEC_CUDA=0"
    try:
        csrc.check_device(csrc.library())
    except CudaKernelError as e:
        return str(e)
    return None


def selection_cases(dev, V=50257) -> list[Case]:
    """fp32 logits (what the decode step hands over) of rows with repetition penalty, 3-gram ban, bad words and
    min length (decode/select.py's RowTables, 64 tokens per row), against the torch op of the op table."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from csrc_checks import selection_case

    from encdec_fast import csrc_ops
    from encdec_fast.decode import ops as dops

    cases = []
    for rows in (1, 64, 512):
        s = torch.randn(rows, V, device=dev) * 3
        case = selection_case("all", rows, V, 64, device=dev)
        cases.append(Case("csrc greedy select (processors fused) vs processors + argmax", f"{rows}x{V}",
                          lambda s=s, c=case: csrc_ops.select_greedy(s, *c, fallback=None),
                          lambda s=s, c=case: dops.select_greedy(s, *c),
                          lambda s=s, c=case: dops.select_greedy(s, *c), "GB/s", rows * V * 4))
    for requests, beams in ((1, 4), (16, 4), (64, 4)):
        rows = requests * beams
        s = torch.randn(rows, V, device=dev) * 3
        case = selection_case("all", rows, V, 64, device=dev)
        run = torch.randn(requests, beams, device=dev)
        cases.append(Case("csrc beam candidates (log-softmax, processors, top 2 x beams) vs torch",
                          f"{requests} x {beams} beams x {V}",
                          lambda s=s, c=case, r=run, k=2 * beams: csrc_ops.select_beam(s, *c, r, k, fallback=None),
                          lambda s=s, c=case, r=run, k=2 * beams: dops.select_beam(s, *c, r, k),
                          lambda s=s, c=case, r=run, k=2 * beams: dops.select_beam(s, *c, r, k), "GB/s", rows * V * 4))
    return cases


def run(dtypes, quick: bool, csrc_only: bool = False) -> str:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if quick:
        B, L, H, D, Lmax, N_ln, N_mlp, rows = 2, 64, 2, 64, 80, 48, 96, (4, 8)
    else:
        B, L, H, D, Lmax, N_ln, N_mlp, rows = 64, 512, 12, 64, 640, 768, 3072, (64, 256)
    no_csrc = csrc_available() if dev == "cuda" else "no CUDA device"
    copy = copy_rate(dev)
    out = []
    for i, dt in enumerate(dtypes):
        torch.manual_seed(0)
        cases = []
        if not csrc_only:
            cases += attention_cases(dt, dev, B, L, H, D)
            cases += varlen_cases(dt, dev, w4_lengths(B, L), H, D)
            for n in rows + (1,):
                cases += decode_cases(dt, dev, n, Lmax, H, D, cross=False)
            for n in rows:
                cases += decode_cases(dt, dev, n, L, H, D, cross=True, beams=4)
                cases += decode_cases(dt, dev, n, L, H, D, cross=True, beams=1)
            cases += decode_cases(dt, dev, 1, L, H, D, cross=True)
            for m in (1, 64 if not quick else 3):
                cases += linear_cases(dt, dev, m, N_ln, N_mlp)
            cases += norm_act_cases(dt, dev, B * L, N_ln, N_mlp)
        if no_csrc is None and i == 0:
            cases += selection_cases(dev)  # fp32 logits: once, whatever the dtypes
        for c in cases:
            ref = _first(c.ref32()).float()
            err_ours = (_first(c.ours()).float() - ref).abs().max().item()
            err_torch = (c.torch_as_ref(_first(c.torch_())).float() - ref).abs().max().item()
            del ref
            ms_ours, ms_torch = _bench(c.ours), _bench(c.torch_)
            scale = 1e12 if c.unit == "TFLOP/s" else 1e9
            rate = lambda ms: c.work / (ms * 1e-3) / scale  # noqa: E731
            of_copy = f"{rate(ms_ours) / copy:.0%}" if c.unit == "GB/s" else "-"
            out.append(f"| {c.op} | {c.shape} | {str(dt).replace('torch.', '')} | {ms_ours:.4f} | {ms_torch:.4f} "
                       f"| {ms_torch / ms_ours:.2f}x | {rate(ms_ours):.1f} | {rate(ms_torch):.1f} | {c.unit} "
                       f"| {of_copy} | {err_ours:.2e} | {err_torch:.2e} |")
            print(out[-1], flush=True)
            if dev == "cuda":
                torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if dev == "cuda" else "CPU (Triton interpreter; timings meaningless)"
    import triton

    head = [
        f"Device: {device}; torch {torch.__version__}, triton {triton.__version__}. "
        "Median of `triton.testing.do_bench` (L2 flushed); max abs error vs an fp32 reference. "
        f"Copy rate (device-to-device copy, bytes read + written): {copy:.0f} GB/s; 'of copy' = ours / that. "
        + (f"csrc rows left out: {no_csrc}" if no_csrc else ""),
        "",
        "| op | shape | dtype | ours ms | torch ms | speedup | ours | torch | unit | of copy | err ours | err torch |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    return "\n".join(head + out) + "\n"


# tiles to compare per head dim: (BLOCK_M, BLOCK_N, num_warps, num_stages); the kernel's own choice
# (kernels/attention.py HALF_TILES: FlashAttention-2's tiles with 8 warps) is timed first, then FA2's own
# 4-warp tiles (which spill registers in Triton on sm_90a) and neighbours
SWEEP_TILES = [(128, 128, 4, 3), (128, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 3),
               (128, 32, 4, 3), (64, 128, 4, 3)]


def tile_sweep(dt, quick: bool) -> str:
    """Dense (no mask, causal) and varlen attention per head dim 64, 80, 128 at W3/W4 sizes, for each
    tile choice; SDPA alongside. Which tiles win is what HALF_TILES should hold (measurement owed)."""
    from encdec_fast.kernels import attention as katt

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    B, L = (2, 64) if quick else (64, 512)
    rows = []
    for D in (64, 80, 128):
        H = 2 if quick else 768 // D  # about bert-base width
        torch.manual_seed(0)
        q, k, v = torch.randn(B, L, 3, H, D, device=dev, dtype=dt).unbind(2)
        t = lambda x: x.transpose(1, 2)  # noqa: E731  (B, L, H, D) <-> (B, H, L, D)
        own = katt._attention_config(L, D, dt)
        tiles = [(own[0], own[1], own[3], own[4])] + [c for c in SWEEP_TILES if c != (own[0], own[1], own[3], own[4])]
        for name, causal in (("no mask", False), ("causal", True)):
            flops = 4.0 * B * H * L * L * D / (2 if causal else 1)
            ms_sdpa = _bench(lambda: F.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=causal))
            for tl_ in tiles:
                ms = _bench(lambda: katt.attention(q, k, v, scale=D ** -0.5, causal=causal, tiles=tl_))
                rows.append(f"| {name} | B={B} L={L} H={H} D={D} | {tl_} | {ms:.4f} | {flops / ms / 1e9:.1f} "
                            f"| {ms_sdpa / ms:.2f}x |")
                print(rows[-1], flush=True)
        for tl_ in tiles:
            c = varlen_cases(dt, dev, w4_lengths(B, L), H, D, tiles=tl_)[0]
            ms, ms_sdpa = _bench(c.ours), _bench(c.torch_)
            rows.append(f"| varlen | {c.shape} | {tl_} | {ms:.4f} | {c.work / ms / 1e9:.1f} | {ms_sdpa / ms:.2f}x |")
            print(rows[-1], flush=True)
    head = ["| attention | shape | tiles (M, N, warps, stages) | ms | TFLOP/s | vs SDPA |",
            "| --- | --- | --- | ---: | ---: | ---: |"]
    return "\n".join(head + rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=["float16", "bfloat16", "float32"])
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    p.add_argument("--csrc-only", action="store_true", help="only the csrc/ kernel rows")
    p.add_argument("--tiles", action="store_true", help="the attention tile sweep instead of the op table")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        if not args.quick:
            print("bench_kernels.py needs a CUDA device (or --quick for a CPU smoke run)", file=sys.stderr)
            return 1
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before encdec_fast.kernels imports triton
    dtypes = [getattr(torch, d) for d in args.dtypes]
    if args.tiles:
        table = "".join(f"\n{str(dt).replace('torch.', '')}:\n\n" + tile_sweep(dt, args.quick) for dt in dtypes)
    else:
        table = run(dtypes, args.quick, args.csrc_only)
    print()
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
