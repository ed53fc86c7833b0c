"""Which storage a model's projection weights get at load, and which op table reads them: load()'s dtype=,
quantize= and prepack= resolved in one place (model.py calls check, transform and table).

  device  backend  dtype      quantize  projection weights                          op table
  cpu     torch    float32    None      fp32, packed (cpu/weights.py)               cpu/weights.TABLE
                                        (oneDNN's fp32 layout without the kernels)  (prepack.TABLE)
  cpu     torch    bfloat16   None      bf16, pair-packed (cpu/weights.py)          cpu/weights.TABLE (fp32 compute)
                                        (AMX: the encoder's in oneDNN's bf16 layout)
                                        (oneDNN's bf16 layout without the kernels)  (prepack.TABLE)
  cpu     torch    fp32/bf16  "int8"    int8 + fp16 scales per 32 inputs, packed    cpu/weights.TABLE (fp32 compute)
  cuda    triton   any        "int8"    int8 [N, K] + fp16 scales [N, K / 32]       TRITON_INT8 (w8a16 fused linear)
  any     any      any        None      plain tensors                               ops.table(backend)

"int8" keeps what it does not quantise (embeddings, LayerNorms, the K/V cache) in dtype: on the CPU bfloat16
unless float32 is named (computed in fp32 either way); on CUDA the stored dtype (fp16/bf16), the activations'.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from . import ops
from . import prepack as prepack_mod
from .checkpoint import WeightTransform
from .cpu import weights as lowp
from .errors import InvalidInputError, UnsupportedArgumentError

MODES = ("int8",)


def default_dtype(quantize, device: torch.device, backend: str) -> torch.dtype | None:
    """The dtype a quantised model stores the rest in when load() names none (None: load()'s own default)."""
    return torch.bfloat16 if quantize is not None and device.type == "cpu" and backend == "torch" else None


def check(quantize, device: torch.device, dtype: torch.dtype, backend: str, prepack: bool) -> None:
    """quantize= against the other resolved choices; raises one clear error naming the cause and the fix."""
    if quantize is None:
        return
    if not isinstance(quantize, str):
        raise InvalidInputError(f"quantize={quantize!r} is not a mode; pass quantize='int8' (or None for the "
                                "checkpoint's floating-point weights).")
    if quantize not in MODES:
        raise UnsupportedArgumentError(f"quantize={quantize!r} is not supported; the modes are "
                                       f"{', '.join(map(repr, MODES))} (or None).")
    if not prepack:
        raise InvalidInputError(f"quantize={quantize!r} packs its int8 weights for its kernels, so prepack=False "
                                "cannot go with it; leave prepack out.")
    if backend == "triton":  # CUDA (or Triton's interpreter on the CPU, for tests): the w8a16 fused linear
        return
    if device.type != "cpu":
        raise UnsupportedArgumentError(f"quantize={quantize!r} on {device.type} runs on the triton backend; "
                                       f"backend={backend!r} reads floating-point weights. Leave backend out.")
    if dtype not in (torch.float32, torch.bfloat16):
        raise UnsupportedArgumentError(
            f"quantize={quantize!r} on the CPU computes in float32 and stores what it does not quantise (embeddings, "
            f"the K/V cache) in float32 or bfloat16; dtype={dtype} cannot go with it. Leave dtype out, or pass "
            "torch.float32 or torch.bfloat16.")


def transform(device: torch.device, dtype: torch.dtype, backend: str, prepack: bool, quantize) -> WeightTransform | None:
    """The load-time conversion of the projection weights (checkpoint.WeightTransform), or None (plain tensors)."""
    if quantize is not None:
        return lowp.INT8 if backend == "torch" else lowp.INT8_PLAIN
    if prepack and lowp.onednn_encoder(device, dtype, backend):  # bf16 on AMX (cpu/weights.py)
        return lowp.BF16_ONEDNN_ENCODER
    if prepack and lowp.bf16_applies(device, dtype, backend):
        return lowp.BF16
    if prepack and lowp.f32_applies(device, dtype, backend):
        return lowp.F32
    return prepack_mod.TRANSFORM if prepack and prepack_mod.applies(device, dtype, backend) else None


def table(net, backend: str):
    """The op table that reads the net's projection weights as they are stored."""
    if lowp.is_packed(net):
        return lowp.TABLE if backend == "torch" else triton_int8_table()
    return prepack_mod.TABLE if prepack_mod.is_packed(net) else ops.table(backend)


# --------------------------------------------------------------------------------------------
# int8 weights on the triton backend: the fused linear kernel reads them (w8a16), at every row count
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def triton_int8_table() -> ops.OpTable:
    from .kernels import linear as klin

    base = ops.table("triton")

    def fused_linear(x, weight, bias=None, **kw):
        if type(weight) is not lowp.PackedWeight:
            return base.fused_linear(x, weight, bias, **kw)
        rows = x.numel() // max(1, x.shape[-1])
        r = kw.get("residual")
        if r is not None:
            kw = kw | {"residual": r.reshape(rows, r.shape[-1])}
        N = weight.shape[0]
        y = klin.fused_linear(x.reshape(rows, x.shape[-1]), weight.values, bias, w_scale=weight.scale, **kw)
        return y.view(*x.shape[:-1], N)

    def linear(x, weight, bias):
        return fused_linear(x, weight, bias)

    def linear_gelu(x, weight, bias, approximate: str):
        return fused_linear(x, weight, bias, gelu=approximate)

    return dataclasses.replace(base, name="triton+int8", linear=linear, linear_gelu=linear_gelu,
                               fused_linear=fused_linear)
