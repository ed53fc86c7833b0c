"""Triton LayerNorm kernels vs the torch reference (encdec_fast.ops.layer_norm / add_layer_norm).

On a CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Outputs are compared with the reference run in fp32; on CUDA, fp16/bf16 outputs must also be within
2x (+ a small atol) of the error of the reference run in that low precision.
"""

import functools

import pytest
import torch
from kernel_checks import DEVICE, ON_CUDA, bf16_needs_cuda, check

from encdec_fast import ops
from encdec_fast.kernels import layer_norm as kln

# (dtype, atol, rtol) against the fp32 reference
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 2e-3, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1.6e-2, 1.6e-2, id="bf16", marks=bf16_needs_cuda),
]
FLASH_ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
# leading shape and hidden size: tiny, odd, BERT-base and BERT-large widths
SHAPES = [(3, 7, 32), (5, 48), (2, 33, 768), (3, 1024)]


_check = functools.partial(check, flash_atol=FLASH_ATOL)


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(DEVICE, dtype)  # non-zero mean on purpose
    r = torch.randn(shape, generator=g).to(DEVICE, dtype)
    w = (1 + 0.2 * torch.randn(N, generator=g)).to(DEVICE, dtype)
    b = (0.1 * torch.randn(N, generator=g)).to(DEVICE, dtype)
    return x, r, w, b


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("eps", [1e-5, 1e-12])  # GPT-2, BERT
def test_layer_norm_matches_reference(shape, eps, dtype, atol, rtol):
    x, _, w, b = _inputs(shape, dtype)
    out = kln.layer_norm(x, w, b, eps)
    ref32 = ops.layer_norm(x.float(), w.float(), b.float(), eps)
    ref_lowp = ops.layer_norm(x, w, b, eps) if ON_CUDA else None
    assert out.dtype == dtype
    _check(out, ref32, atol, rtol, f"layer_norm {shape}", ref_lowp)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_layer_norm_matches_reference_and_returns_the_sum(shape, dtype, atol, rtol):
    x, r, w, b = _inputs(shape, dtype, seed=1)
    normed, summed = kln.add_layer_norm(x, r, w, b, 1e-5)
    ref_normed, ref_summed = ops.add_layer_norm(x, r, w, b, 1e-5)  # in x's dtype
    # the sum is x + residual rounded to x's dtype, exactly like the reference
    torch.testing.assert_close(summed, ref_summed, atol=0, rtol=0)
    ref32, _ = ops.add_layer_norm(x.float(), r.float(), w.float(), b.float(), 1e-5)
    _check(normed, ref32, atol, rtol, f"add_layer_norm {shape}", ref_normed if ON_CUDA else None)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[:2])
def test_layer_norm_without_affine_parameters(dtype, atol, rtol):
    x, _, _, _ = _inputs((4, 48), dtype)
    out = kln.layer_norm(x, None, None, 1e-5)
    _check(out, ops.layer_norm(x.float(), None, None, 1e-5), atol, rtol, "layer_norm without weight/bias")


def test_layer_norm_on_strided_rows():
    x, r, w, b = _inputs((6, 2, 64), torch.float32)
    xs, rs = x[::2, 1], r[1::2, 0]  # [3, 64] rows with a row stride of 4*64
    out = kln.layer_norm(xs, w, b, 1e-5)
    _check(out, ops.layer_norm(xs, w, b, 1e-5), 1e-5, 1e-5, "layer_norm on strided rows")
    normed, summed = kln.add_layer_norm(xs, rs, w, b, 1e-5)
    ref_normed, ref_summed = ops.add_layer_norm(xs, rs, w, b, 1e-5)
    _check(summed, ref_summed, 0, 0, "add_layer_norm sum on strided rows")
    _check(normed, ref_normed, 1e-5, 1e-5, "add_layer_norm on strided rows")


def test_layer_norm_of_a_constant_row_is_the_bias():
    x = torch.full((2, 48), 3.0, device=DEVICE)
    w, b = torch.ones(48, device=DEVICE), torch.linspace(-1, 1, 48, device=DEVICE)
    out = kln.layer_norm(x, w, b, 1e-12)
    assert torch.isfinite(out).all()
    _check(out, b.expand(2, 48), 1e-6, 0, "layer_norm of a constant row")


def test_layer_norm_rejects_bad_inputs():
    x, r, w, b = _inputs((3, 32), torch.float32)
    with pytest.raises(ValueError, match="weight"):
        kln.layer_norm(x, w[:16], b, 1e-5)
    with pytest.raises(ValueError, match="dtype"):
        kln.layer_norm(x, w.half(), b, 1e-5)
    with pytest.raises(ValueError, match="dtype"):
        kln.layer_norm(x.long(), None, None, 1e-5)
    with pytest.raises(ValueError, match="residual"):
        kln.add_layer_norm(x, r[:2], w, b, 1e-5)
