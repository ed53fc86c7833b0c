"""What the kernel tests share: the device, the bf16 rule, and the comparison with the torch reference."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_CUDA = DEVICE == "cuda"

needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device")
bf16_needs_cuda = pytest.mark.skipif(
    not ON_CUDA, reason="bf16 arithmetic is wrong under Triton's CPU interpreter; bf16 is tested on CUDA only")


# (dtype, atol, rtol) of attention outputs against the fp32 reference
ATTN_DTYPES = [
    pytest.param(torch.float32, 2e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 2e-3, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1.6e-2, 1.6e-2, id="bf16", marks=bf16_needs_cuda),
]
ATTN_FLASH_ATOL = {torch.float16: 5e-4, torch.bfloat16: 4e-3}  # slack of the 2x criterion


def randn(*shape, dtype=torch.float32):
    """Normal values drawn in fp32 (the same numbers whatever the dtype), then rounded to dtype."""
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(dtype)


def check(out, ref32, atol, rtol, what, ref_lowp=None, *, flash_atol):
    """out vs the fp32 reference; on CUDA also the flash-attention criterion: our low-precision error
    <= 2x the error of the reference run in that precision (+ flash_atol[dtype] slack)."""
    assert out.shape == ref32.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref32.shape)}"
    ref32 = ref32.float()
    err = (out.float() - ref32).abs()
    bad = err > atol + rtol * ref32.abs()
    assert not bad.any(), (f"{what}: max abs err {err.max().item():.3e}, mean {err.mean().item():.3e} "
                           f"(atol {atol}, rtol {rtol}, {bad.sum().item()} elements out)")
    if ON_CUDA and ref_lowp is not None and out.dtype in flash_atol:
        ours, theirs = err.max().item(), (ref_lowp.float() - ref32).abs().max().item()
        assert ours <= 2 * theirs + flash_atol[out.dtype], (
            f"{what}: our {out.dtype} max err {ours:.3e} (mean {err.mean().item():.3e}) exceeds 2x torch's "
            f"{theirs:.3e} + {flash_atol[out.dtype]}")
