"""Projection weights prepacked for oneDNN: the CPU torch backend's fast fp32 and bf16 linear.

On the CPU, PyTorch's F.linear goes to MKL's sgemm, which is slow at decode sizes: measured on this
project's 2-core AVX-512 CI machine, a 768 -> 50257 LM head at 1 row takes 11.3 ms through F.linear and
4.5 ms through oneDNN with the weight reordered once into its blocked layout (24 ms and 5.7 ms at 8
rows); the decoder's 768-wide projections run 1.5-3x faster the same way, and the encoder's 128-row
products about 1.1x. Every projection weight of the net (nn.Linear's [out, in] buffers and the LM head)
is replaced by that reordered tensor, once: at load as each weight is read (checkpoint/assign.py, through
``TRANSFORM``: one plain copy alive at a time), or for a whole net with ``pack(net)``. The model then
runs on this file's op table (``TABLE``: the torch reference's, whose products call oneDNN with the bias,
GELU or residual add fused into the same call). ``unpack(net)`` restores the plain tensors (before a move
to another device or dtype, or to the triton backend, whose kernels read plain memory).

fp32 and bf16 weights on the CPU get this layout where the CPU's own kernels cannot run (cpu/weights.py packs
them otherwise, for faster fp32 products and bf16 ones with fp32 outputs) and this torch build has oneDNN; bf16
only where oneDNN runs bf16 on this CPU: AVX512-BF16 or AMX tiles, which oneDNN picks itself. fp32 results are the
same products summed in another order: logits within ~1e-6 relative of F.linear's, and tokens equal to
transformers' in the parity tests, which run on packed weights by default. oneDNN's bf16 products accumulate in
fp32 and round once to bf16, with the bias, GELU or residual add fused before that rounding.

Decode attention on this table is the CPU kernel's (cpu/kernels.py: every row's window in one call per layer),
the reference where it cannot run.

Memory: a packed weight replaces its plain tensor, except an LM head tied to the word embeddings,
which the embedding lookup still reads plain; that head gets its own packed copy (vocabulary x width
floats more, 154 MB for GPT-2's). load(prepack=False) keeps everything plain.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import ops
from .checkpoint import WeightTransform
from .cpu import weights as lowp
from .modules import Linear, LMHead

# the batch size oneDNN's reorder is told to expect. Measured on a decode step's projections (bert-base +
# gpt2, weights not in cache): a hint of 8 reads 26.7 GB/s at 1 row and 26.6 GB/s at 8; a hint of 1 reads
# 29 GB/s at 1 row but 15.5 GB/s at 8. With weights in cache 8 also beat 1 at one row, and beat larger
# hints up to the encoder's prefill sizes.
_ROWS_HINT = 8


def available(dtype: torch.dtype = torch.float32) -> bool:
    """True when this torch build can run packed linears in dtype (built with oneDNN; bf16: and oneDNN runs
    bf16 on this CPU)."""
    ops = torch.ops.mkldnn  # oneDNN's entry points for inductor's frozen CPU graphs (private: checked, not assumed)
    if not (torch.backends.mkldnn.is_available() and all(hasattr(ops, n) for n in ("_reorder_linear_weight",
                                                                                  "_linear_pointwise"))):
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and hasattr(ops, "_is_mkldnn_bf16_supported") and ops._is_mkldnn_bf16_supported()


def applies(device: torch.device, dtype: torch.dtype, backend: str) -> bool:
    """Whether a model on (device, dtype, backend) gets packed weights: fp32 or bf16 on the CPU, torch backend."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and backend == "torch" and available(dtype)


def _slots(net: nn.Module):
    """(module, buffer name) of every projection weight: each Linear's and the LM head's matrix."""
    for m in net.modules():
        if isinstance(m, (Linear, LMHead)) and m._buffers.get("weight") is not None:
            yield m, "weight"


def slot_names(net: nn.Module) -> frozenset[str]:
    """The buffer names (from the net's root) of every projection weight."""
    return frozenset(f"{n}.weight" if n else "weight" for n, m in net.named_modules() if isinstance(m, (Linear, LMHead)))


@torch.inference_mode()
def pack_tensor(w: torch.Tensor) -> torch.Tensor:
    """One weight [out, in], reordered (a new tensor; w is not changed)."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), _ROWS_HINT)


@torch.inference_mode()
def pack(net: nn.Module) -> None:
    """Reorder every projection weight of net in place (idempotent). Weights shared between modules
    (tie_encoder_decoder) stay shared: each tensor is packed once."""
    done: dict[int, torch.Tensor] = {}
    for m, name in _slots(net):
        w = m._buffers[name]
        if w.is_mkldnn or type(w) is not torch.Tensor:  # packed already, or another storage (quantize.py's int8)
            continue
        if id(w) not in done:
            done[id(w)] = pack_tensor(w)
        m._buffers[name] = done[id(w)]


@torch.inference_mode()
def unpack(net: nn.Module) -> None:
    """Plain tensors back in place of packed ones (bit-identical to the weights before pack); an LM head
    that was tied to the word embeddings shares their tensor again."""
    done: dict[int, torch.Tensor] = {}
    for m, name in _slots(net):
        w = m._buffers[name]
        if w.is_mkldnn:
            if id(w) not in done:
                done[id(w)] = w.to_dense()
            m._buffers[name] = done[id(w)]
    if hasattr(net, "tie_head"):
        net.tie_head()


def is_packed(net: nn.Module) -> bool:
    return any(m._buffers[name].is_mkldnn for m, name in _slots(net))


def _pointwise(x, weight, bias, gelu=None, residual=None):
    """gelu?(x @ weight.T + bias) + residual with a packed weight [N, K]: one oneDNN call. x [..., K]
    (any strides); gelu None, "none" (erf form) or "tanh"; residual [..., N] or None (not with gelu)."""
    if residual is not None:
        if gelu is not None:
            raise ValueError("prepack: gelu and residual are not fused together")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), weight, bias, "add")
    if gelu is not None:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], gelu)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# --------------------------------------------------------------------------------------------
# the op table of a net with packed weights: the torch reference's, with the products through oneDNN
# (a weight that is not packed goes to the reference op)
# --------------------------------------------------------------------------------------------
def linear(x, weight, bias):
    return _pointwise(x, weight, bias) if weight.is_mkldnn else ops.linear(x, weight, bias)


def linear_gelu(x, weight, bias, approximate: str):
    return _pointwise(x, weight, bias, gelu=approximate) if weight.is_mkldnn else ops.linear_gelu(x, weight, bias,
                                                                                                   approximate)


def fused_linear(x, weight, bias=None, *, x_ln=None, gelu=None, residual=None, residual_ln=None):
    if not weight.is_mkldnn:
        return ops.fused_linear(x, weight, bias, x_ln=x_ln, gelu=gelu, residual=residual, residual_ln=residual_ln)
    if gelu not in (None, "none", "tanh"):
        raise ValueError(f"fused_linear: gelu must be None, 'none' or 'tanh', got {gelu!r}")
    x, residual = ops.fused_linear_inputs(x, residual, x_ln, residual_ln)
    return _pointwise(x, weight, bias, gelu=gelu, residual=residual)


# decode attention: the CPU kernel (cpu/kernels.py: one call per layer for every row's window, where the
# reference makes one SDPA call per request), or the reference where it cannot run
TABLE = dataclasses.replace(ops.TORCH, name="torch+onednn", linear=linear, linear_gelu=linear_gelu,
                            fused_linear=fused_linear, decode_attention=lowp.decode_attention)

# what checkpoint.build_net applies as each weight is read
TRANSFORM = WeightTransform(names=slot_names, tensor=pack_tensor, net=pack, dense=lambda t: t.to_dense())
