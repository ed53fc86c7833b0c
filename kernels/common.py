"""What the attention kernels share: accepted dtypes, the SM count, and the input checks of q/k/v and masks."""

from __future__ import annotations

import torch

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SM_COUNTS: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (an H100's 132 off CUDA, so choices are reproducible)."""
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNTS:
        _SM_COUNTS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNTS[idx]


def check_qkv(q, k, v, q_dims: int, name: str, kv_dims: int = 4) -> None:
    for t, nm, nd in ((q, "q", q_dims), (k, "k", kv_dims), (v, "v", kv_dims)):
        if not isinstance(t, torch.Tensor) or t.dim() != nd:
            raise ValueError(f"{name}: {nm} must be a {nd}-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name}: {nm} has dtype {t.dtype}; use float16, bfloat16 or float32")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name}: {nm} needs unit stride on the head dim (got strides {t.stride()});"
                             " call .contiguous() first")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{name}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{name}: k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    D = q.shape[-1]
    if k.shape[-1] != D or k.shape[-2] != q.shape[-2]:
        raise ValueError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on heads/head dim")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim {D} unsupported; the kernel handles 1..{MAX_HEAD_DIM}")


def check_mask(key_mask, shape: tuple, device, name: str) -> torch.Tensor:
    """key_mask as uint8 0/1 (a bool mask is viewed, not copied; other dtypes: nonzero = attend)."""
    if not isinstance(key_mask, torch.Tensor) or tuple(key_mask.shape) != shape:
        raise ValueError(f"{name}: key_mask must be a bool tensor of shape {shape} (True = attend), got "
                         f"{tuple(getattr(key_mask, 'shape', ())) or type(key_mask).__name__}")
    if key_mask.device != device:
        raise ValueError(f"{name}: key_mask is on {key_mask.device}, q on {device}")
    if key_mask.dtype != torch.bool:
        key_mask = key_mask != 0
    return key_mask.view(torch.uint8)
