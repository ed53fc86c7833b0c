"""Fused small-row linear kernel vs the torch reference (encdec_fast.ops.fused_linear).

Every option combination that the decoder layers use: GPT-2 (pre-LN) LN+QKV, O/fc2 + residual,
LN2+fc1+gelu(tanh), ln_f + LM head (no bias); BERT (post-LN) the same with the residual LayerNorm-ed
(residual_ln) and gelu's erf form. Rows M in 1, 3, 17 (17: a 32-row tile, part empty); K and N in
awkward sizes (37, 64, 80, 130). Compared with the reference in fp32 on the same rounded inputs; on
CUDA, fp16/bf16 errors must also be within 2x (+ slack) of the reference's own low-precision error.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICE, ON_CUDA, bf16_needs_cuda, check

from encdec_fast import ops
from encdec_fast.kernels import linear as klin

_check = functools.partial(check, flash_atol={torch.float16: 1e-3, torch.bfloat16: 8e-3})

# name -> (bias, x_ln, gelu, residual, residual_ln)
COMBOS = {
    "qkv_with_ln": (True, True, None, False, False),  # GPT-2 LN1+QKV, LN+cross-Q; BERT QKV after a post-LN
    "o_plus_residual": (True, False, None, True, False),  # GPT-2 O and fc2 + residual
    "o_plus_ln_residual": (True, False, None, True, True),  # BERT O and fc2: + LN(previous sum)
    "fc1_ln_gelu_tanh": (True, True, "tanh", False, False),  # GPT-2 LN2+fc1+gelu_new
    "fc1_ln_gelu_erf": (True, True, "none", False, False),  # BERT fc1+gelu after a post-LN
    "lm_head_ln_no_bias": (False, True, None, False, False),  # GPT-2 ln_f + tied LM head
    "plain": (True, False, None, False, False),
    "plain_no_bias": (False, False, None, False, False),
}
SHAPES = [(37, 80), (64, 130), (130, 64)]  # (K, N)


def _inputs(M, K, N, combo, dtype, *, offset=0.0):
    has_bias, x_ln, gelu, residual, residual_ln = COMBOS[combo]
    g = torch.Generator(device="cpu").manual_seed(M * 1000 + K + N)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=DEVICE, dtype=dtype)

    args = (rnd(M, K, shift=offset), rnd(N, K, scale=K ** -0.5), rnd(N, scale=0.1) if has_bias else None)
    kw = {}
    if x_ln:
        kw["x_ln"] = (rnd(K, scale=0.1, shift=1.0), rnd(K, scale=0.1), 1e-5)
    if gelu:
        kw["gelu"] = gelu
    if residual:
        kw["residual"] = rnd(M, N, shift=offset)
    if residual_ln:
        kw["residual_ln"] = (rnd(N, scale=0.1, shift=1.0), rnd(N, scale=0.1), 1e-12)
    return args, kw


def _fp32(t):
    if isinstance(t, tuple):
        return tuple(_fp32(x) for x in t)
    return t.float() if isinstance(t, torch.Tensor) else t


def _compare(M, K, N, combo, dtype, atol, rtol, *, offset=0.0):
    args, kw = _inputs(M, K, N, combo, dtype, offset=offset)
    out = klin.fused_linear(*args, **kw)
    ref32 = ops.fused_linear(*_fp32(args), **{n: _fp32(x) for n, x in kw.items()})
    ref_lowp = ops.fused_linear(*args, **kw) if ON_CUDA else None
    assert out.shape == (M, N) and out.dtype == dtype and out.is_contiguous()
    _check(out, ref32, atol, rtol, f"fused_linear {combo} M={M} K={K} N={N} {dtype}", ref_lowp)


CASES = [pytest.param(M, *SHAPES[(i + j) % len(SHAPES)], combo, id=f"{combo}-M{M}-K{SHAPES[(i + j) % 3][0]}")
         for i, combo in enumerate(COMBOS) for j, M in enumerate((1, 3, 17))]


@pytest.mark.parametrize("M, K, N, combo", CASES)
def test_fused_linear_fp32_matches_reference(M, K, N, combo):
    _compare(M, K, N, combo, torch.float32, 2e-5, 1e-5)


@pytest.mark.parametrize("dtype, atol, rtol", [
    pytest.param(torch.float16, 4e-3, 4e-3, id="fp16"),
    pytest.param(torch.bfloat16, 3e-2, 3e-2, id="bf16", marks=bf16_needs_cuda),
])
@pytest.mark.parametrize("combo", list(COMBOS))
def test_fused_linear_low_precision_matches_reference(combo, dtype, atol, rtol):
    i = list(COMBOS).index(combo)
    _compare(3 if i % 2 else 17, *SHAPES[i % len(SHAPES)], combo, dtype, atol, rtol)


def test_layer_norm_statistics_over_several_tiles_with_a_large_mean():
    """K = 300 and N = 130 span several statistics tiles for 17 rows (merged with Chan's formula);
    rows offset by 40 would lose digits to E[x^2] - E[x]^2."""
    _compare(17, 300, 130, "fc1_ln_gelu_erf", torch.float32, 5e-5, 1e-5, offset=40.0)
    _compare(17, 300, 130, "o_plus_ln_residual", torch.float32, 5e-5, 1e-5, offset=40.0)


def test_op_table_uses_the_kernel_up_to_64_rows_and_cublas_beyond(monkeypatch):
    calls = []
    kernel = klin.fused_linear
    monkeypatch.setattr(klin, "fused_linear", lambda *a, **k: calls.append(a[0].shape) or kernel(*a, **k))
    fused = ops.table("triton").fused_linear
    for shape in ((2, 5, 37), (70, 37)):  # 10 rows in a 3-D input; 70 rows
        (x, w, b), kw = _inputs(shape[-2], 37, 64, "o_plus_ln_residual", torch.float32)
        x = x.expand(*shape).contiguous() if len(shape) == 3 else x
        kw["residual"] = kw["residual"].expand(*shape[:-1], 64).contiguous()
        out = fused(x, w, b, **kw)
        want = ops.fused_linear(x, w, b, **kw)
        assert out.shape == want.shape
        _check(out, want, 2e-5, 1e-5, f"op table {shape}")
    assert calls == [(10, 37)]  # the 70-row call went to the reference


def test_fused_linear_rejects_bad_inputs():
    (x, w, b), kw = _inputs(3, 37, 64, "o_plus_ln_residual", torch.float32)
    with pytest.raises(ValueError, match="weight"):
        klin.fused_linear(x, w[:, :36], b)
    with pytest.raises(ValueError, match="bias"):
        klin.fused_linear(x, w, b[:63])
    with pytest.raises(ValueError, match="gelu"):
        klin.fused_linear(x, w, b, gelu="relu")
    with pytest.raises(ValueError, match="residual_ln needs a residual"):
        klin.fused_linear(x, w, b, residual_ln=kw["residual_ln"])
    with pytest.raises(ValueError, match="residual"):
        klin.fused_linear(x, w, b, residual=kw["residual"][:, :10])
    with pytest.raises(ValueError, match="x_ln"):
        klin.fused_linear(x, w, b, x_ln=(w[0], w[0]))
    with pytest.raises(ValueError, match="dtype"):
        klin.fused_linear(x, w.double(), b)
    with pytest.raises(ValueError, match="gelu"):
        ops.fused_linear(x, w, b, gelu="relu")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_reference_rounds_the_product_before_the_bias(approximate):
    """ops.linear_gelu is a matmul without bias followed by bias + GELU (the product rounded to the dtype
    first), so the torch and triton tables (whose bias_gelu is a kernel) round alike."""
    x, w, b = torch.randn(5, 32).half(), torch.randn(48, 32).half(), torch.randn(48).half()
    assert torch.equal(ops.linear_gelu(x, w, b, approximate), ops.bias_gelu(F.linear(x, w), b, approximate))


# --------------------------------------------------------------------------------------------
# int8 weights (w8a16: load(quantize="int8") on CUDA)
# --------------------------------------------------------------------------------------------
def _int8(w):
    """w [N, K] -> (q int8 [N, K], scale fp16 [N, ceil(K / 32)]) as load(quantize="int8") quantises
    (cpu/weights.py)."""
    from encdec_fast.cpu.weights import quantize_rows

    q, s = quantize_rows(w.float().cpu())
    return q.to(w.device), s.to(w.device)


@pytest.mark.parametrize("dtype, atol, rtol", [
    pytest.param(torch.float32, 2e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 4e-3, 4e-3, id="fp16"),
    pytest.param(torch.bfloat16, 3e-2, 3e-2, id="bf16", marks=bf16_needs_cuda),
])
@pytest.mark.parametrize("combo", list(COMBOS))
def test_fused_linear_int8_weights_match_the_dequantised_reference(combo, dtype, atol, rtol):
    """The int8 tile converted to x's dtype (exact), each group's fp32 dot scaled per output column: the reference
    is ops.fused_linear on the dequantised weight (scale[n, k // 32] * q[n, k]) in fp32."""
    i = list(COMBOS).index(combo)
    M, (K, N) = (1, 17, 3)[i % 3], SHAPES[i % len(SHAPES)]
    (x, w, b), kw = _inputs(M, K, N, combo, dtype)
    q, scale = _int8(w)
    out = klin.fused_linear(x, q, b, w_scale=scale, **kw)
    deq = q.float() * scale.float().repeat_interleave(klin.INT8_GROUP, 1)[:, :K]
    ref32 = ops.fused_linear(x.float(), deq, _fp32(b), **{n: _fp32(v) for n, v in kw.items()})
    ref_lowp = ops.fused_linear(x, deq.to(dtype), b, **kw) if ON_CUDA else None
    assert out.shape == (M, N) and out.dtype == dtype
    _check(out, ref32, atol, rtol, f"int8 fused_linear {combo} M={M} {dtype}", ref_lowp)


def test_fused_linear_int8_rejects_bad_scales():
    (x, w, b), _ = _inputs(3, 37, 64, "plain", torch.float32)
    q, scale = _int8(w)
    with pytest.raises(ValueError, match="w_scale"):
        klin.fused_linear(x, q, b)  # no scales
    with pytest.raises(ValueError, match="w_scale"):
        klin.fused_linear(x, w, b, w_scale=scale)  # scales for a float weight
    with pytest.raises(ValueError, match="w_scale"):
        klin.fused_linear(x, q, b, w_scale=scale[:10])
    with pytest.raises(ValueError, match="w_scale"):
        klin.fused_linear(x, q, b, w_scale=scale.float())  # fp16 scales only
    with pytest.raises(ValueError, match="w_scale"):
        klin.fused_linear(x, q, b, w_scale=scale[:, :1])  # one group per 32 inputs
    with pytest.raises(ValueError, match="w_scale"):
        klin.fused_linear(x, q, b, w_scale=torch.cat([scale, scale], 1)[:, ::2])  # not unit stride


def test_int8_group_is_the_cpu_format():
    from encdec_fast.cpu import weights as lowp

    assert klin.INT8_GROUP == lowp.GROUP
