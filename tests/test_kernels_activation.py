"""Triton bias + GELU kernel vs the torch reference (encdec_fast.ops.bias_gelu).

On a CPU the kernel runs under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Outputs are compared with the reference run in fp32; on CUDA, fp16/bf16 outputs must also be within
2x (+ a small atol) of the error of the reference run in that low precision.
"""

import functools

import pytest
import torch
from kernel_checks import DEVICE, ON_CUDA, bf16_needs_cuda, check

from encdec_fast import ops
from encdec_fast.kernels import activation as kact

# (dtype, atol, rtol) against the fp32 reference
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-3, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 8e-3, 1.6e-2, id="bf16", marks=bf16_needs_cuda),
]
FLASH_ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
# tiny, odd, and a BERT-base MLP width (3072 = 3 column tiles of 1024)
SHAPES = [(3, 7, 32), (5, 48), (2, 7, 3072)]


_check = functools.partial(check, flash_atol=FLASH_ATOL)


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype)
    b = torch.randn(shape[-1], generator=g).to(DEVICE, dtype)
    return x, b


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("approximate", ["none", "tanh"])  # BERT's gelu, GPT-2's gelu_new
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_bias_gelu_matches_reference(shape, approximate, with_bias, dtype, atol, rtol):
    x, b = _inputs(shape, dtype)
    b = b if with_bias else None
    out = kact.bias_gelu(x, b, approximate)
    # reference on the same rounded inputs: x + bias rounded to x's dtype, then gelu in fp32
    s = (x + b) if b is not None else x
    ref32 = ops.bias_gelu(s.float(), None, approximate)
    ref_lowp = ops.bias_gelu(x, b, approximate) if ON_CUDA else None
    assert out.dtype == dtype and out.shape == x.shape
    _check(out, ref32, atol, rtol, f"bias_gelu {approximate} {shape}", ref_lowp)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_is_finite_and_exact_at_the_tails(approximate):
    x = torch.tensor([[-1e4, -60.0, -20.0, -5.0, -1e-6, 0.0, 1e-6, 5.0, 20.0, 60.0, 1e4]], device=DEVICE)
    out = kact.bias_gelu(x, None, approximate)
    assert torch.isfinite(out).all(), out
    _check(out, ops.bias_gelu(x, None, approximate), 1e-6, 1e-6, f"bias_gelu {approximate} tails")


def test_bias_gelu_on_strided_rows():
    x, b = _inputs((4, 2, 48), torch.float32)
    xs = x[:, 1]  # [4, 48] rows with a row stride of 96
    out = kact.bias_gelu(xs, b, "tanh")
    assert out.is_contiguous()
    _check(out, ops.bias_gelu(xs, b, "tanh"), 1e-5, 1e-5, "bias_gelu on strided rows")


def test_bias_gelu_rejects_bad_inputs():
    x, b = _inputs((3, 32), torch.float32)
    with pytest.raises(ValueError, match="approximate"):
        kact.bias_gelu(x, b, "erf")
    with pytest.raises(ValueError, match="bias"):
        kact.bias_gelu(x, b[:16], "none")
    with pytest.raises(ValueError, match="dtype"):
        kact.bias_gelu(x, b.half(), "none")
    with pytest.raises(ValueError, match="dtype"):
        kact.bias_gelu(x.long(), None, "none")
