"""int8 projection weights on the CPU: ``load(path, quantize="int8")``.

Every projection weight (each Linear's [out, in] matrix: self- and cross-attention, MLP, enc_to_dec_proj,
the BERT head's dense) and the LM head are stored int8 with one fp32 scale per output channel
(symmetric: w[n, k] ~ scale[n] * q[n, k], |q| <= 127, scale[n] = max_k |w[n, k]| / 127), quantised as each
weight is read at load (checkpoint/assign.py's WeightTransform: one plain copy alive at a time), and
packed once for fbgemm. Embeddings, LayerNorms and biases stay fp32; so do the activations between the
projections (LayerNorm, attention, residual stream, logits).

The product runs through torch's ``quantized.linear_dynamic`` (fbgemm): in one call it quantises the
activations to uint8 with one scale and zero point over the call's input (its min and max), multiplies
in int32 (AVX512-VNNI where the CPU has it) and dequantises to fp32. Why that kernel, measured on this
project's 2-core AVX512-VNNI/BF16 machine (benchmarks/bench_cpu_linear.py, a decode step's 73 projections
with weights out of cache): it read its weights faster than every other int8 product torch ships at
decode sizes (1-8 rows: 1.5-2x oneDNN's qlinear_pointwise with the activation quantisation in Python
ops around it, 3-10x aten._weight_int8pack_mm, which is fast at one row only and slow beyond), and as
fast as oneDNN's at the encoder's 128-1024 rows; weight-only int8 (bf16/fp32 activations) has no fast
multi-row kernel in torch (aten._weight_int8pack_mm) nor in oneDNN as torch exposes it.

The cost of that choice: activations are quantised per call, not per token, so a row's rounding depends
on the largest activation among the rows computed with it (the beams of a request, the other requests of
a batch). At one row that is per-token quantisation. The quality figures (tests/test_quality.py,
benchmarks/quality.py) are measured at batch 1 and batch 8.

A quantised model cannot move to another device or dtype (the fp32 weights are gone): load it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .checkpoint import WeightTransform
from .errors import UnsupportedArgumentError
from .modules import Linear, LMHead

MODES = ("int8",)
_ROWS_PER_CHUNK = 4096  # rows quantised at a time: a weight's fp32 temporaries stay a few MB (load memory)


def available() -> bool:
    """True when this torch build has fbgemm's int8 kernels (x86-64 builds do; ARM builds do not)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


class Int8Weight(torch.Tensor):
    """A projection weight [out, in] stored int8 with per-output-channel scales, packed for fbgemm. It has
    the shape, dtype (int8) and size of the int8 matrix but no readable storage: it is read only by this
    file's op table, and any other torch op on it raises (a quantised model cannot be moved or cast)."""

    packed: torch.ScriptObject  # fbgemm's LinearPackedParamsBase (the int8 matrix, its scales, no bias)

    @staticmethod
    def __new__(cls, packed, out_features: int, in_features: int):
        return torch.Tensor._make_wrapper_subclass(cls, (out_features, in_features), dtype=torch.int8,
                                                   device=torch.device("cpu"), requires_grad=False)

    def __init__(self, packed, out_features: int, in_features: int):
        self.packed = packed

    def __repr__(self):
        return f"Int8Weight({tuple(self.shape)}, per-output-channel scales, fbgemm)"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:  # nn.Module bookkeeping
            return args[0]
        raise UnsupportedArgumentError(
            f"{func} on an int8 weight: the weights of a quantize='int8' model are packed int8 and only its own "
            "ops read them (the fp32 weights are gone). Load the checkpoint again without quantize= for another "
            "device or dtype.")

    def dequantize(self) -> torch.Tensor:
        """The fp32 matrix the int8 one stands for (scale[n] * q[n, k]): tests and quality checks."""
        qw, _ = torch.ops.quantized.linear_unpack(self.packed)
        return qw.dequantize()


@contextlib.contextmanager
def _engine(name: str):
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q int8 [N, K], scale fp32 [N]): symmetric per row, scale = max |w[n]| / 127 (a
    zero row gets scale 1). Quantised _ROWS_PER_CHUNK rows at a time, so the fp32 temporaries stay small."""
    N, K = w.shape
    q = torch.empty(N, K, dtype=torch.int8)
    scale = torch.empty(N, dtype=torch.float32)
    for a in range(0, N, _ROWS_PER_CHUNK):
        part = w[a:a + _ROWS_PER_CHUNK].float()
        s = part.abs().amax(dim=1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[a:a + _ROWS_PER_CHUNK] = torch.round(part / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[a:a + _ROWS_PER_CHUNK] = s
    return q, scale


@torch.inference_mode()
def quantize_tensor(w: torch.Tensor) -> Int8Weight:
    """One weight [out, in] -> its Int8Weight (a new tensor; w is not changed)."""
    N, K = w.shape
    q, scale = quantize_rows(w)
    with warnings.catch_warnings(), _engine("fbgemm"):
        warnings.simplefilter("ignore")  # torch deprecates quantized tensors; fbgemm's prepack still takes one
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(N, dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(qw, None)
    return Int8Weight(packed, N, K)


def _slots(net: nn.Module):
    for m in net.modules():
        if isinstance(m, (Linear, LMHead)) and m._buffers.get("weight") is not None:
            yield m


def slot_names(net: nn.Module) -> frozenset[str]:
    """The buffer names (from the net's root) of every projection weight (prepack.py's)."""
    return frozenset(f"{n}.weight" if n else "weight" for n, m in net.named_modules() if isinstance(m, (Linear, LMHead)))


@torch.inference_mode()
def quantize_net(net: nn.Module) -> None:
    """Quantise every projection weight of net that is still plain (idempotent; shared weights stay shared)."""
    done: dict[int, torch.Tensor] = {}
    for m in _slots(net):
        w = m._buffers["weight"]
        if isinstance(w, Int8Weight):
            continue
        if id(w) not in done:
            done[id(w)] = quantize_tensor(w)
        m._buffers["weight"] = done[id(w)]


def is_quantized(net: nn.Module) -> bool:
    return any(isinstance(m._buffers["weight"], Int8Weight) for m in _slots(net))


def _no_dense(t):
    raise RuntimeError("internal: an int8 weight cannot give back its fp32 tensor; the plain consumer of a shared "
                       "tensor must be read before the quantised one (checkpoint/weight_map.py's order)")


# --------------------------------------------------------------------------------------------
# the op table of a net with int8 weights: the torch reference's, with the products through fbgemm
# (a weight that is not int8 goes to the reference op)
# --------------------------------------------------------------------------------------------
def _product(x, weight: Int8Weight, bias):
    """x [..., K] fp32 -> x @ dequant(weight).T + bias [..., N] fp32 (activations quantised per call)."""
    y = torch.ops.quantized.linear_dynamic(x, weight.packed, False)
    return y.add_(bias) if bias is not None else y


def linear(x, weight, bias):
    return _product(x, weight, bias) if type(weight) is Int8Weight else ops.linear(x, weight, bias)


def linear_gelu(x, weight, bias, approximate: str):
    if type(weight) is not Int8Weight:
        return ops.linear_gelu(x, weight, bias, approximate)
    return F.gelu(_product(x, weight, bias), approximate=approximate)


def fused_linear(x, weight, bias=None, *, x_ln=None, gelu=None, residual=None, residual_ln=None):
    if type(weight) is not Int8Weight:
        return ops.fused_linear(x, weight, bias, x_ln=x_ln, gelu=gelu, residual=residual, residual_ln=residual_ln)
    if gelu not in (None, "none", "tanh"):
        raise ValueError(f"fused_linear: gelu must be None, 'none' or 'tanh', got {gelu!r}")
    x, residual = ops.fused_linear_inputs(x, residual, x_ln, residual_ln)
    y = _product(x, weight, bias)
    if gelu is not None:
        y = F.gelu(y, approximate=gelu)
    return y.add_(residual) if residual is not None else y


TABLE = dataclasses.replace(ops.TORCH, name="torch+int8", linear=linear, linear_gelu=linear_gelu,
                            fused_linear=fused_linear)

# what checkpoint.build_net applies as each weight is read
TRANSFORM = WeightTransform(names=slot_names, tensor=quantize_tensor, net=quantize_net, dense=_no_dense)
