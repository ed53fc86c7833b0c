"""The CPU low-precision kernels (csrc/cpu_linear.cpp through encdec_fast/cpu/kernels.py) against the torch
reference: the int8 product (int8 weights, fp16 scales per output and group of 32 inputs, int16 activations), the bf16 product
(activations rounded to bf16), both with fp32 outputs and the bias / residual fused; the pair-packed layout;
the decode attention over fp32 and bf16 keys. Shapes are awkward on purpose (odd K, N not a multiple of the
32-output block, 9 and 17 rows past the 8-row pass, 0 rows, strided inputs)."""

import pytest
import torch

from encdec_fast import ops
from encdec_fast.cpu import kernels as ck
from encdec_fast.cpu import weights as lowp

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only path"),
    pytest.mark.skipif(ck.library() is None, reason=f"CPU kernels not available here: {ck.reason()}"),
]

SHAPES = [(1, 7, 5), (3, 33, 130), (9, 96, 300), (17, 64, 33), (8, 768, 97), (0, 16, 9), (2, 3072, 64), (5, 70, 40)]


def test_kernels_build_on_this_machine():
    # the CI machine has AVX-512 (VNNI, BF16) and g++: if this fails, the fast path silently is not tested
    flags = ck._cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl"} <= flags and ck._compiler():
        assert ck.library() is not None, ck.reason()
        assert ck.has_bf16() == ("avx512_bf16" in flags)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(1, 1), (5, 7), (33, 64), (64, 3)])
def test_pack_round_trip(dtype, n, k):
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8).to(dtype)
    p = ck.pack(w)
    assert p.numel() == ck.packed_rows(n) * ((k + 1) // 2) * 2
    assert torch.equal(ck.unpack(p, n, k), w)


def _case(M, K, N, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) * 0.05
    b = torch.randn(N, generator=g)
    r = torch.randn(M, N, generator=g)
    return x, w, b, r


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("with_bias,with_residual", [(True, True), (True, False), (False, True), (False, False)])
def test_int8_product_matches_reference(M, K, N, with_bias, with_residual):
    x, w, b, r = _case(M, K, N, M * 1000 + K)
    b, r = (b if with_bias else None), (r if with_residual else None)
    pw = lowp.to_int8(w)
    assert pw.packed and pw.is_int8 and tuple(pw.shape) == (N, K)
    q, scale = lowp.quantize_rows(w)
    assert torch.equal(pw.matrix(), q) and torch.equal(pw.scales(), scale) and scale.dtype == torch.float16
    deq = q.float() * scale.float().repeat_interleave(lowp.GROUP, 1)[:, :K]
    assert torch.equal(pw.dequantize(), deq)
    ref = x @ deq.T  # fp32 activations: the kernel rounds them to int16 per row
    if b is not None:
        ref = ref + b
    if r is not None:
        ref = ref + r
    got = lowp.product(x, pw, b, r)
    # int16 activations: each row's error is at most ~sum_k |w| * |x|max / 32767
    xmax = x.abs().max().item() if x.numel() else 0.0
    tol = 4e-5 * xmax * deq.abs().sum(1).max().item() + 1e-5
    torch.testing.assert_close(got, ref, rtol=0, atol=tol)


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_bf16_product_matches_reference(M, K, N):
    if not ck.has_bf16():
        pytest.skip("no AVX512-BF16 here")
    x, w, b, r = _case(M, K, N, M * 7 + K)
    pw = lowp.to_bf16(w)
    assert pw.packed and not pw.is_int8 and torch.equal(pw.matrix(), w.bfloat16())
    ref = x.bfloat16().float() @ w.bfloat16().float().T + b + r  # bf16 products, fp32 sums
    torch.testing.assert_close(lowp.product(x, pw, b, r), ref, rtol=1e-5, atol=1e-5)


def test_products_take_3d_and_strided_inputs_and_bf16_activations():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 24, generator=g)
    pw = lowp.to_int8(w)
    x3 = torch.randn(2, 5, 24, generator=g)
    xs = torch.randn(5, 48, generator=g)[:, ::2]
    ref = lambda x: x.float() @ pw.dequantize().T  # noqa: E731
    torch.testing.assert_close(lowp.product(x3, pw), ref(x3), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(lowp.product(xs, pw), ref(xs), rtol=1e-3, atol=1e-3)
    xb = x3.bfloat16()
    out = lowp.product(xb, pw)  # bf16 activations (a bf16 model's embeddings) are read as fp32
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref(xb), rtol=1e-3, atol=1e-3)


def test_reference_path_equals_kernel_numbers(monkeypatch):
    """Where the kernels cannot run, PackedWeight holds the plain matrix and the torch reference computes the
    same products (up to the int16 rounding of the activations)."""
    x, w, b, r = _case(6, 50, 70, 11)
    fast = lowp.to_int8(w)
    monkeypatch.setattr(ck, "_lib", "disabled for the test")
    slow = lowp.to_int8(w)
    assert not slow.packed and torch.equal(slow.matrix(), fast.matrix())
    ref = x @ fast.dequantize().T + b + r
    torch.testing.assert_close(lowp.product(x, slow, b, r), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    torch.testing.assert_close(lowp.product(x, fast, b, r), ref, rtol=0, atol=1e-3)


def test_zero_rows_and_constant_rows():
    w = torch.zeros(20, 40)
    w[3] = 0.5  # a zero group gets scale 1 (q = 0), a constant one q = 127
    w[5, 32:] = 1e-9  # its scale underflows fp16: 1, q = 0
    q, scale = lowp.quantize_rows(w)
    assert scale.shape == (20, 2) and (scale[0] == 1).all() and (q[0] == 0).all() and (q[3] == 127).all()
    assert scale[5, 1] == 1 and (q[5] == 0).all()
    pw = lowp.to_int8(w)
    x = torch.zeros(2, 40)  # all-zero activations: scale 1, no division by zero
    assert torch.equal(lowp.product(x, pw), torch.zeros(2, 20))


def test_groups_keep_small_weights_apart_from_large_ones():
    # a row whose first 32 inputs are 1000x the rest: per-channel scales would round the rest to 0; groups keep them
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 96, generator=g) * 1e-3
    w[:, :32] *= 1000
    pw = lowp.to_int8(w)
    err = (pw.dequantize() - w).abs()
    assert (err[:, 32:] <= w[:, 32:].abs().amax() / 127).all()
    assert (pw.matrix()[:, 32:] != 0).float().mean() > 0.9


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e7])
def test_int8_refuses_weights_fp16_scales_cannot_hold(bad):
    from encdec_fast.errors import InvalidInputError

    w = torch.zeros(4, 8)
    w[1, 2] = bad
    with pytest.raises(InvalidInputError, match="without quantize"):
        lowp.to_int8(w)


def test_scale_pack_round_trip():
    for n, groups in ((1, 1), (33, 3), (64, 2), (100, 5)):
        s = torch.randn(n, groups).half()
        out = torch.empty(ck.packed_rows(n) * groups, dtype=torch.float16)
        ck.pack_scales(out, n, 0, s)
        assert torch.equal(ck.unpack_scales(out, n, groups), s)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [16, 24, 64, 80, 128])
def test_decode_attention_matches_reference(kv_dtype, D):
    g = torch.Generator().manual_seed(D)
    T, H = 70, 3
    k, v = torch.randn(T, H, D, generator=g).to(kv_dtype), torch.randn(T, H, D, generator=g).to(kv_dtype)
    q = torch.randn(4, H, D, generator=g)
    for starts, lens in (([0, 15, 30, 45], [15, 3, 9, 1]), ([30, 0, 30, 7], [20, 15, 12, 0]), ([5] * 4, [30] * 4),
                         ([0, 0, 0, 0], [70, 1, 33, 64])):
        st, ln = torch.tensor(starts), torch.tensor(lens, dtype=torch.int32)
        ref = ops.decode_attention(q, k.float(), v.float(), scale=0.3, starts=st, lens=ln)
        got = lowp.decode_attention(q, k, v, scale=0.3, starts=st, lens=ln)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6)


def test_decode_attention_writes_new_keys_like_the_reference():
    g = torch.Generator().manual_seed(0)
    N, L, H, D = 3, 9, 2, 16
    cache_ref = torch.randn(N * L, H, D, generator=g)
    cache = cache_ref.clone().bfloat16()
    cache_ref = cache.float()
    q, kn = torch.randn(N, H, D, generator=g), torch.randn(N, H, D, generator=g)
    st, ln = torch.arange(N) * L, torch.tensor([4, 9, 1], dtype=torch.int32)
    vr, vb = cache_ref.clone(), cache.clone()
    ref = ops.decode_attention(q, cache_ref, vr, scale=0.25, starts=st, lens=ln, k_new=kn.bfloat16().float(),
                               v_new=kn.bfloat16().float())
    got = lowp.decode_attention(q, cache, vb, scale=0.25, starts=st, lens=ln, k_new=kn, v_new=kn)
    assert torch.equal(cache.float(), cache_ref) and torch.equal(vb.float(), vr)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("int8", [True, False], ids=["int8", "bf16"])
@pytest.mark.parametrize("M,K,N", [(1, 64, 40), (9, 33, 70), (3, 768, 130)])
def test_fused_layer_norm_and_gelu_match_the_reference(int8, M, K, N):
    """fused_linear's prologue (LayerNorm of the input rows) and epilogue (GELU, tanh and erf forms) in the kernel
    against F.layer_norm / F.gelu around the same product."""
    if not int8 and not ck.has_bf16():
        pytest.skip("no AVX512-BF16 here")
    import torch.nn.functional as F

    x, w, b, r = _case(M, K, N, 5 * M + K)
    x = x * 3 + 1  # a mean and a scale for the LayerNorm to remove
    g = torch.Generator().manual_seed(1)
    ln = (torch.rand(K, generator=g) + 0.5, torch.randn(K, generator=g), 1e-5)
    pw = lowp.to_int8(w) if int8 else lowp.to_bf16(w)
    for gelu in (None, "tanh", "none"):
        for res in (None, r):
            got = lowp.fused_linear(x, pw, b, x_ln=ln, gelu=gelu, residual=res)
            h = F.layer_norm(x, (K,), ln[0], ln[1], ln[2])
            if not int8:
                h = h.bfloat16().float()
            y = h @ pw.dequantize().T + b
            y = F.gelu(y, approximate=gelu) if gelu else y
            ref = y + res if res is not None else y
            tol = 2e-3 * ref.abs().max().item() if int8 else 2e-5 * ref.abs().max().item() + 1e-5
            torch.testing.assert_close(got, ref, rtol=0, atol=tol, msg=f"gelu={gelu} residual={res is not None}")


def test_gelu_epilogue_accuracy():
    """The kernel's GELUs against torch's on a wide range: |error| < 1e-6 (relative to max(1, |x|))."""
    x = torch.linspace(-12, 12, 4001)[:, None]  # rows of one input channel: y = x * 1 (an identity weight)
    pw = lowp.to_bf16(torch.ones(1, 1)) if ck.has_bf16() else None
    if pw is None:
        pytest.skip("no AVX512-BF16 here")
    xb = x.bfloat16().float()  # exact inputs for a bf16 product
    for gelu in ("tanh", "none"):
        got = lowp.product(xb, pw, gelu=gelu)
        ref = torch.nn.functional.gelu(xb.double(), approximate=gelu).float()
        err = ((got - ref).abs() / xb.abs().clamp(min=1)).max().item()
        assert err < 1e-6, (gelu, err)


@pytest.mark.parametrize("rows,n,k", [(1, 9, 9), (3, 17, 9), (32, 50257, 9), (5, 100, 1), (2, 1000, 40), (4, 300, 256)])
def test_row_topk_matches_torch_topk_values(rows, n, k):
    g = torch.Generator().manual_seed(rows * n + k)
    for trial in range(6):
        x = torch.randn(rows, n, generator=g)
        if trial % 3 == 1:
            x = torch.round(x * 4) / 4  # many ties
        if trial % 3 == 2:
            x[:, ::7] = float("-inf")
        vals, idx = ck.row_topk(x, k)
        assert torch.equal(vals, torch.topk(x, k).values)
        assert torch.equal(x.gather(1, idx), vals)
        tied = vals[:, 1:] == vals[:, :-1]
        assert ((idx[:, 1:] > idx[:, :-1]) | ~tied).all()  # the lower index first among equal values


def test_row_topk_leaves_nan_rows_to_torch():
    x = torch.randn(4, 100)
    x[2, 50] = float("nan")
    assert ck.row_topk(x, 5) is None


@pytest.mark.parametrize("case", ["distinct", "tied", "nan", "tiny vocabulary"])
def test_cpu_select_beam_equals_torch_topk(case):
    """decode/ops.cpu_select_beam ranks candidates from each row's k + 1 best (row_topk): its answer must be the
    reference's (torch.topk over the whole (R, nb * V) scores), and it hands ties and NaN to torch.topk itself."""
    from encdec_fast.decode import ops as dops
    from encdec_fast.decode import select as sel

    g = torch.Generator().manual_seed(7)
    R, nb, V = 3, 4, 5 if case == "tiny vocabulary" else 1000
    logits = torch.randn(R * nb, V, generator=g)
    if case == "tied":
        logits = torch.round(logits)  # equal log-probs within a row: ties among the candidates
    if case == "nan":
        logits[1, 3] = float("nan")
    running = torch.randn(R, nb, generator=g)
    args = (logits, torch.zeros(R * nb, 4, dtype=torch.long), torch.ones(R * nb, dtype=torch.long),
            sel.RowTables(R * nb, V, "cpu"), sel.Spec(), running, 2 * nb)
    got, want = dops.cpu_select_beam(*args), dops.select_beam(*args)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got[1], want[1])
    log_probs = torch.log_softmax(logits, -1)
    fast = dops.cpu_top_candidates(log_probs, running, 2 * nb)
    assert (fast is not None) == (case == "distinct"), case  # the row top-k answered only without ties


@pytest.mark.parametrize("rows,n", [(1, 1), (3, 17), (8, 50257), (5, 16), (2, 33)])
def test_row_argmax_is_torch_argmax_and_flags_nonfinite_rows(rows, n):
    g = torch.Generator().manual_seed(rows + n)
    x = torch.round(torch.randn(rows, n, generator=g) * 2)  # ties: the first index of the largest value
    idx, bad = ck.row_argmax(x)
    assert torch.equal(idx, torch.argmax(x, dim=-1)) and not bad.any()
    wide = torch.randn(rows, n + 7, generator=g)[:, 3:n + 3]  # a row stride past n
    assert torch.equal(ck.row_argmax(wide)[0], torch.argmax(wide, dim=-1))
    for special in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[rows // 2, n // 2] = special
        idx, bad = ck.row_argmax(y)
        assert bad.tolist() == [r == rows // 2 for r in range(rows)]
        assert ((idx >= 0) & (idx < n)).all()
        keep = ~bad
        assert torch.equal(idx[keep], torch.argmax(y, dim=-1)[keep])


def test_cpu_scan_logits_equals_the_reference():
    from encdec_fast.decode import ops as dops

    g = torch.Generator().manual_seed(3)
    logits = torch.round(torch.randn(6, 300, generator=g) * 3)
    logits[1, 7] = float("nan")
    logits[4, 9] = float("-inf")
    busy = torch.tensor([True, True, True, False, True, True])
    stop_t = torch.tensor([0, 0, 5, 0, 0, 0])
    got_flags, want_flags = torch.zeros(6, dtype=torch.bool), torch.zeros(6, dtype=torch.bool)
    got = dops.cpu_scan_logits(logits, busy, stop_t, got_flags, argmax=True)
    want = dops.scan_logits(logits, busy, stop_t, want_flags, argmax=True)
    assert torch.equal(got_flags, want_flags) and got_flags.tolist() == [False, True, False, False, True, False]
    ok = ~torch.isnan(logits).any(-1) & ~torch.isinf(logits).any(-1)
    assert torch.equal(got[ok], want[ok])
    assert dops.cpu_scan_logits(logits, busy, stop_t, got_flags, argmax=False) is None


def test_the_cpu_decode_table_takes_the_kernels_versions():
    from encdec_fast.decode import ops as dops

    cpu = dops.table("torch", "cpu")
    assert cpu.scan_logits is dops.cpu_scan_logits and cpu.select_beam is dops.cpu_select_beam
    assert cpu.commit_tokens is dops.cpu_commit_tokens
    assert dops.table("torch").scan_logits is dops.scan_logits  # no device: the reference


@pytest.mark.parametrize("seed", range(12))
def test_commit_tokens_kernel_equals_the_torch_version(seed):
    # random rows: plain and beam, busy or idle, alive or not, at or below their limit, at the last token slot (the
    # write clamps), with eos lists padded with -1, already stopped or not, with or without a stop step recorded
    from encdec_fast.decode import ops as dops

    g = torch.Generator().manual_seed(seed)
    N, Lc, E = int(torch.randint(0, 10, (1,), generator=g)), 6, 3
    bits = lambda p: torch.rand(N, generator=g) < p  # noqa: E731
    t = torch.randint(1, Lc + 2, (N,), generator=g)
    limit = torch.randint(1, Lc + 1, (N,), generator=g)
    eos = torch.randint(0, 6, (N, E), generator=g)
    eos[bits(0.5), 1:] = -1
    pad = torch.randint(0, 6, (N,), generator=g)
    tokens = torch.randint(0, 6, (N,), generator=g)
    stop_t = torch.where(bits(0.3), t, 0)
    args = [tokens, torch.randint(0, 50, (N, Lc), generator=g), t, limit, bits(0.7), bits(0.8), bits(0.3), bits(0.5),
            stop_t, pad, eos, torch.tensor(int(seed)), torch.tensor(0 if seed % 2 else 3)]
    want = [a.clone() for a in args]
    dops.commit_tokens(*want)
    assert ck.commit_tokens(*args)
    for a, b in zip(args, want):
        assert torch.equal(a, b)
    # what the kernel does not read goes back to the caller untouched
    assert not ck.commit_tokens(tokens.int(), *args[1:])
    assert not ck.commit_tokens(*args[:4], args[4].long(), *args[5:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [None, 0, 1, 5])
def test_move_rows_is_indexing_with_every_read_before_any_write(dtype, length):
    g = torch.Generator().manual_seed(11)
    buf = torch.randn(6, 8, 7, 3, 4, generator=g).to(dtype)  # (K/V x layers, rows, slots, H, D)
    dst, src = torch.tensor([0, 1, 2, 5, 6]), torch.tensor([1, 0, 1, 6, 2])  # a swap, a shared parent, a chain
    want = buf.clone()
    cut = slice(None) if length is None else slice(0, length)
    want[:, dst, cut] = buf[:, src, cut]
    ck.move_rows(buf, dst, src, length)
    assert torch.equal(buf, want)
    with pytest.raises(RuntimeError, match="move_rows"):
        ck.move_rows(buf, torch.tensor([8]), torch.tensor([0]))  # out of range


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_writes_strided_new_keys_as_torch_rounds_them(kv_dtype):
    """The kernel writes k_new / v_new (strided views of a QKV product, as the decode step passes them) at their
    slots, rounded as Tensor.to rounds, before any row attends; a slot outside the cache is refused."""
    g = torch.Generator().manual_seed(4)
    N, L, H, D = 4, 6, 3, 16
    k = torch.randn(N * L, H, D, generator=g).to(kv_dtype)
    v = torch.randn(N * L, H, D, generator=g).to(kv_dtype)
    qkv = torch.randn(N, 3 * H * D, generator=g).unflatten(-1, (3, H, D))
    q, kn, vn = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # strided (N, H, D) views
    st, ln = torch.arange(N) * L, torch.tensor([3, 6, 1, 2], dtype=torch.int32)
    slots = st + ln.long() - 1
    k_ref, v_ref = k.clone(), v.clone()
    k_ref[slots], v_ref[slots] = kn.to(kv_dtype), vn.to(kv_dtype)
    want = ops.decode_attention(q, k_ref.float(), v_ref.float(), scale=0.2, starts=st, lens=ln)
    got = ck.decode_attention(q, k, v, st, ln.long(), 0.2, kn, vn, slots)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    with pytest.raises(RuntimeError, match="decode_attention"):
        ck.decode_attention(q, k, v, st, ln.long(), 0.2, kn, vn, slots + N * L)
