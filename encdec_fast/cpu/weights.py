"""Packed projection weights on the CPU, with fp32 activations: int8 (``load(quantize="int8")``), bf16
(``load(dtype=torch.bfloat16)``) and fp32 (the default).

Every projection weight (each Linear's [out, in] matrix: self- and cross-attention, MLP, enc_to_dec_proj, the
BERT head's dense) and the LM head are converted as each weight is read at load (checkpoint/assign.py's
WeightTransform: one plain copy alive at a time) into a PackedWeight:

  int8  symmetric, one fp16 scale per output channel and group of GROUP = 32 inputs (llama.cpp's Q8_0):
        w[n, k] ~ scale[n, k // 32] * q[n, k], |q| <= 127, scale[n, g] = max |w[n, 32 g : 32 g + 32]| / 127.
        8.5 bits a weight (0.27x fp32's bytes). Why groups: per-output-channel scales alone agree with fp32 on
        98.4-98.7% of the real-weight positions (KL 6.1-6.4e-4); groups of 32 on 99.3% (KL 2e-4), see
        benchmarks/quality.py.
  bf16  the weight rounded to bf16.
  fp32  the weight as it is (each output one fp32 sum over k in order: tokens equal transformers' in the parity
        tests, as with oneDNN's layout, which it replaces where the kernels run: 17.4 ms a bert-base + gpt2 step's
        projections at 1 row against oneDNN's 25.5, the machine's ~31 GB/s).

and run through kernels.py's products: fp32 activations in, fp32 sums, fp32 out, with the input rows' LayerNorm,
the bias, the GELU and the residual add fused (the int8 product quantises each activation row to int16 inside the
call, the bf16 one rounds it to bf16). Everything else computes in fp32: LayerNorm (their parameters and the
projection biases are kept fp32, 0.1% of the weights), attention (kernels.py's decode attention reads bf16 keys in
place), the residual stream and the logits that token selection reads. The embeddings and the decode state's K/V
cache keep the model's dtype (bf16 halves them). Each row is computed alike whatever rows share its call (per-row
quantisation, per-row sums in a fixed order): a request's tokens do not depend on its batch.

Why fp32 activations, measured on real weights (tests/test_quality.py's MiniLM, 853 positions; KL(fp32 ||
candidate) of the next-token distributions, teacher-forced): bf16 products whose outputs are rounded to bf16
(oneDNN's bf16 linear, as transformers' bf16) give KL 1.3e-4 and 98.8% top-1 agreement, the same products with
fp32 outputs 4.8e-5 and 99.8%. int8 weights with the activations quantised to int8 (fbgemm's and oneDNN's int8
products: per call or per token) give 5-7e-3 (95-97%); with int16 activations 6.4e-4 (98.4%), about as with fp32
ones; those are per-output-channel scales: groups of 32 bring int16 activations to 2.2e-4 (99.3%).
Speed (benchmarks/bench_cpu_linear.py: a decode step's 73 projections, bert-base + gpt2, 2 threads, weights out
of cache; medians of one run, 2026-12-06): int8 (group scales) 6.5 ms at 1 row (fbgemm's int8 x int8 8.4, oneDNN
bf16 15.2, oneDNN fp32 28.6), 9.9 ms at 8 rows (fbgemm 9.6: int16 activations halve VNNI's multiply rate, so from
~8 rows the int8 product is compute-bound); bf16 10.2 ms at 1 row, 13.3 at 8 (oneDNN bf16 15.2 / 16.0), within 10%
of oneDNN bf16 at the encoder's 128-512 rows.

Where kernels.py is not available (no AVX-512, no C++ compiler): int8 weights run the torch reference below
(dequantised per call: the same numbers, slowly), and fp32 and bf16 models load oneDNN's layouts instead
(prepack.py; bf16 activations for bf16).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..checkpoint import WeightTransform
from ..errors import InvalidInputError, UnsupportedArgumentError
from ..modules import LayerNorm, Linear, LMHead
from . import kernels, step

_ROWS_PER_CHUNK = 1024  # rows converted at a time (a multiple of 32): temporaries of a few MB (load memory)
GROUP = 32  # int8: inputs that share a scale (the triton backend's fused linear reads one group per K tile)
_INT8_MAX_WEIGHT = 127 * 65504.0  # the largest |w| an fp16 scale covers


class PackedWeight(torch.Tensor):
    """A projection weight [out, in] stored int8 (with fp16 group scales), bf16 or fp32, in kernels.py's
    packed layout (or plain [out, in] where the kernels are not available, or for the triton backend). It has the
    shape, dtype and size of the matrix it stands for but no storage of its own: this file's op table reads it;
    other torch ops read a bf16 or fp32 one as its plain matrix and refuse an int8 one."""

    values: torch.Tensor  # pair-packed (flat) or plain [N, K]: int8 or bf16
    scale: torch.Tensor | None  # int8: fp16 group scales, kernels.pack_scales' layout (packed) or [N, groups] (plain)
    packed: bool  # data in kernels.py's layout (else plain)

    @staticmethod
    def __new__(cls, data, scale, out_features: int, in_features: int, packed: bool):
        return torch.Tensor._make_wrapper_subclass(cls, (out_features, in_features), dtype=data.dtype,
                                                   device=data.device, requires_grad=False)

    def __init__(self, data, scale, out_features: int, in_features: int, packed: bool):
        self.values, self.scale, self.packed = data, scale, packed

    def __repr__(self):
        kind = f"int8, scales per {GROUP} inputs" if self.scale is not None else str(self.dtype).replace("torch.", "")
        return f"PackedWeight({tuple(self.shape)}, {kind})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        """A bf16 or fp32 weight reads as its plain matrix in any op that does not write to it (torch.equal, .float(),
        indexing: what scripts and tests inspect weights with); an int8 one, and any write, raise."""
        if func is torch.ops.aten.detach.default:  # nn.Module bookkeeping
            return args[0]
        packed = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, PackedWeight)]
        if func._schema.is_mutable or any(p.is_int8 for p in packed):
            raise UnsupportedArgumentError(
                f"{func} on a packed {'int8' if any(p.is_int8 for p in packed) else 'low-precision'} weight: only "
                "encdec_fast's own ops read it (and nothing writes to it). A quantize='int8' model cannot move or "
                "change dtype (its floating-point weights are gone): load the checkpoint again.")
        plain = lambda a: a.matrix() if isinstance(a, PackedWeight) else a  # noqa: E731
        return func(*[plain(a) for a in args], **{k: plain(v) for k, v in (kwargs or {}).items()})

    @property
    def is_int8(self) -> bool:
        return self.scale is not None

    def matrix(self) -> torch.Tensor:
        """The [N, K] matrix (int8 or bf16), unpacked."""
        N, K = self.shape
        return kernels.unpack(self.values, N, K) if self.packed else self.values

    def scales(self) -> torch.Tensor:
        """An int8 weight's fp16 scales [N, groups], unpacked."""
        N, K = self.shape
        return kernels.unpack_scales(self.scale, N, -(-K // GROUP)) if self.packed else self.scale

    def dequantize(self) -> torch.Tensor:
        """The fp32 matrix it stands for (scale[n, k // GROUP] * q[n, k] for int8)."""
        w = self.matrix().float()
        if not self.is_int8:
            return w
        return w * self.scales().float().repeat_interleave(GROUP, dim=1)[:, :w.shape[1]]


# ------------------------------------------------------------------------------------------------
# conversion
# ------------------------------------------------------------------------------------------------
def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q int8 [N, K], scale fp16 [N, ceil(K / GROUP)]): symmetric per row and group of GROUP
    inputs, scale = max |w[n, group]| / 127 rounded to fp16 (a group whose scale rounds to 0 gets 1: its q are 0), q =
    round(w / scale) within +-127."""
    N, K = w.shape
    groups = -(-K // GROUP)
    wg = F.pad(w.float(), (0, groups * GROUP - K)).view(N, groups, GROUP)
    amax = wg.abs().amax(dim=2)
    if not bool((amax <= _INT8_MAX_WEIGHT).all()):  # also false for NaN
        what = f"values up to {amax.max().item():.3g}" if bool(torch.isfinite(amax).all()) else "non-finite values"
        raise InvalidInputError(f"quantize='int8': a projection weight holds {what}, beyond what int8 with fp16 scales "
                                f"stores (|w| <= {_INT8_MAX_WEIGHT:.3g}); load this checkpoint without quantize.")
    s = (amax / 127).half()
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(wg / s.float()[:, :, None]).clamp_(-127, 127).to(torch.int8)
    return q.view(N, groups * GROUP)[:, :K], s


def _convert(w: torch.Tensor, int8: bool, plain: bool = False, dtype: torch.dtype = torch.bfloat16) -> PackedWeight:
    """w [N, K] -> its int8 or bf16 PackedWeight, _ROWS_PER_CHUNK rows at a time: what is alive besides w and the
    result is one chunk's temporaries (load memory). Pair-packed for kernels.py where it runs (a CPU weight),
    else plain [N, K] on w's device (plain: always; the triton backend's fused linear reads it). dtype: a float
    weight's (bf16, or fp32)."""
    N, K = w.shape
    packed = not plain and w.device.type == "cpu" and kernels.has_int8() and (
        int8 or dtype == torch.float32 or kernels.has_bf16())
    dtype = torch.int8 if int8 else dtype
    values = kernels.packed_empty(N, K, dtype) if packed else torch.empty(N, K, dtype=dtype, device=w.device)
    groups = -(-K // GROUP)
    scale = None
    if int8:
        scale = (torch.empty(kernels.packed_rows(N) * groups, dtype=torch.float16) if packed
                 else torch.empty(N, groups, dtype=torch.float16, device=w.device))
    for a in range(0, N, _ROWS_PER_CHUNK):
        part = w[a:a + _ROWS_PER_CHUNK]
        if int8:
            part, s = quantize_rows(part)
            if packed:
                kernels.pack_scales(scale, N, a, s)
            else:
                scale[a:a + s.shape[0]] = s
        else:
            part = part.to(dtype)
        if packed:
            kernels.pack_rows(values, N, K, a, part)
        else:
            values[a:a + part.shape[0]] = part
    return PackedWeight(values, scale, N, K, packed)


@torch.inference_mode()
def to_int8(w: torch.Tensor) -> PackedWeight:
    """One weight [out, in] -> its int8 PackedWeight (a new tensor; w is not changed)."""
    return _convert(w, True)


@torch.inference_mode()
def to_bf16(w: torch.Tensor) -> PackedWeight:
    """One weight [out, in] -> its bf16 PackedWeight (a new tensor; w is not changed)."""
    return _convert(w, False)


def _named_slots(net: nn.Module):
    for n, m in net.named_modules():
        if isinstance(m, (Linear, LMHead)) and m._buffers.get("weight") is not None:
            yield n, m


def _slots(net: nn.Module):
    return (m for _, m in _named_slots(net))


def slot_names(net: nn.Module) -> frozenset[str]:
    """The buffer names (from the net's root) of every projection weight (prepack.py's)."""
    return frozenset(f"{n}.weight" if n else "weight" for n, m in net.named_modules() if isinstance(m, (Linear, LMHead)))


@torch.inference_mode()
def to_f32(w: torch.Tensor) -> PackedWeight:
    """One weight [out, in] -> its fp32 PackedWeight (a new tensor; w is not changed)."""
    return _convert(w.float(), False, dtype=torch.float32)


@torch.inference_mode()
def to_int8_plain(w: torch.Tensor) -> PackedWeight:
    """One weight [out, in] -> its int8 PackedWeight, plain [N, K] on w's device (the triton backend's)."""
    return _convert(w, True, plain=True)


@torch.inference_mode()
def pack_net(net: nn.Module, convert, fp32_rest: bool = True, convert_for=None) -> None:
    """Convert (to_int8 or to_bf16) every projection weight of net that is still plain (idempotent; a weight shared
    by slots of one conversion stays shared), and (fp32_rest) keep the LayerNorm parameters and projection biases in
    fp32, as this file's op table reads them. convert_for(module name): another conversion for that slot, or None."""
    step.forget(net)
    done: dict[tuple, torch.Tensor] = {}
    for name, m in _named_slots(net):
        w = m._buffers["weight"]
        if type(w) is torch.Tensor and not w.is_mkldnn:
            conv = (convert_for(name) if convert_for is not None else None) or convert
            if (id(w), conv) not in done:
                done[id(w), conv] = conv(w)
            m._buffers["weight"] = done[id(w), conv]
    for m in net.modules() if fp32_rest else ():
        names = ("weight", "bias") if isinstance(m, LayerNorm) else ("bias",) if isinstance(m, (Linear, LMHead)) else ()
        for name in names:
            t = m._buffers.get(name)
            if t is not None and t.dtype != torch.float32:
                m._buffers[name] = t.float()


@torch.inference_mode()
def unpack_net(net: nn.Module, dtype: torch.dtype) -> None:
    """Plain bf16 tensors back in place of bf16 PackedWeights (exactly the weights packed), the LayerNorm parameters
    and biases in dtype again (before a move to another device or dtype). int8 weights cannot be unpacked."""
    step.forget(net)
    done: dict[int, torch.Tensor] = {}
    for m in _slots(net):
        w = m._buffers["weight"]
        if isinstance(w, PackedWeight):
            if w.is_int8:
                raise UnsupportedArgumentError("int8 weights cannot be turned back into floating-point ones: load the "
                                               "checkpoint again.")  # bf16 and fp32 ones come back exactly
            if id(w) not in done:
                done[id(w)] = w.matrix().clone()
            m._buffers["weight"] = done[id(w)]
    for m in net.modules():
        for name in ("weight", "bias") if isinstance(m, LayerNorm) else ("bias",) if isinstance(m, (Linear, LMHead)) else ():
            t = m._buffers.get(name)
            if t is not None:
                m._buffers[name] = t.to(dtype)
    if hasattr(net, "tie_head"):
        net.tie_head()


def is_packed(net: nn.Module) -> bool:
    return any(isinstance(m._buffers["weight"], PackedWeight) for m in _slots(net))


def is_int8(net: nn.Module) -> bool:
    return any(isinstance(m._buffers["weight"], PackedWeight) and m._buffers["weight"].is_int8 for m in _slots(net))


def bf16_applies(device: torch.device, dtype: torch.dtype, backend: str) -> bool:
    """Whether a model on (device, dtype, backend) gets bf16 PackedWeights: bf16 on the CPU (torch backend), where
    kernels.py runs bf16 products (AVX512-BF16)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and backend == "torch" and kernels.has_bf16()


# ------------------------------------------------------------------------------------------------
# bf16 on AMX: the encoder's products through oneDNN
# ------------------------------------------------------------------------------------------------
# The encoder's products (and the cross-attention K/V projections and enc_to_dec_proj, which read the encoder's output)
# run over every source token at once: compute-bound, where kernels.py's AVX512-BF16 loop reaches about this CPU's peak
# (the bert-base encoder at 8 x 128 tokens: 0.49 s, ~350 GFLOP/s on 2 cores). On a CPU with AMX tiles oneDNN's bf16
# matmul runs them on the tiles instead (transformers' bf16 model does: torch's bf16 linear is oneDNN's), so a bf16
# model there keeps those weights in oneDNN's layout (prepack.py) and computes y = bf16(x) @ w.T in oneDNN, rounded
# to bf16 by it, then bias, GELU and residual in fp32. The decode step's products (one to a few rows: weight reads,
# not arithmetic) stay on kernels.py. Not timed on an AMX CPU yet (the project's machines have none); checked for
# its numbers here by forcing it: ENCDEC_CPU_ENCODER=onednn (auto: AMX only; kernels: never).
ENCODER_ROUTES = ("auto", "onednn", "kernels")


def _encoder_route() -> str:
    route = os.environ.get("ENCDEC_CPU_ENCODER", "auto") or "auto"
    if route not in ENCODER_ROUTES:
        raise InvalidInputError(f"ENCDEC_CPU_ENCODER={route!r} is not a route; set it to one of "
                                f"{', '.join(ENCODER_ROUTES)} (or unset it: auto).")
    return route


def has_amx() -> bool:
    """This CPU has AMX tiles (bf16 products on them through oneDNN)."""
    check = getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", None)
    return bool(check()) if check is not None else False


def onednn_encoder(device: torch.device, dtype: torch.dtype, backend: str) -> bool:
    """Whether a bf16 model on (device, dtype, backend) runs its encoder-side products in oneDNN (see above)."""
    if not bf16_applies(device, dtype, backend):
        return False
    route = _encoder_route()
    if route == "kernels" or (route == "auto" and not has_amx()):
        return False
    from .. import prepack

    return prepack.available(torch.bfloat16)


def encoder_slots(net: nn.Module) -> frozenset[str]:
    """The module names of the products that read every source token: the encoder's, enc_to_dec_proj, each decoder
    layer's cross-attention K/V."""
    return frozenset(n for n, _ in _named_slots(net)
                     if n.startswith("encoder.") or n == "enc_to_dec_proj" or n.endswith(".cross.kv"))


def _to_onednn_bf16(w: torch.Tensor) -> torch.Tensor:
    from .. import prepack

    return prepack.pack_tensor(w.to(torch.bfloat16))


def pack_net_onednn_encoder(net: nn.Module) -> None:
    """pack_net(net, to_bf16) but for encoder_slots, whose weights are reordered for oneDNN in bf16 instead (a weight an
    encoder-side slot shares with another slot gets one copy in each layout)."""
    encoder = encoder_slots(net)
    pack_net(net, to_bf16, convert_for=lambda name: _to_onednn_bf16 if name in encoder else None)


def _onednn(x, weight, bias=None, *, gelu=None, residual=None) -> torch.Tensor:
    """x [..., K] fp32 @ a oneDNN-reordered bf16 weight: oneDNN's bf16 product (rounded to bf16 by it), then the bias,
    the GELU and the residual in fp32."""
    y = torch.ops.mkldnn._linear_pointwise(_f32(x).to(torch.bfloat16), weight, None, "none", [], "").float()
    if bias is not None:
        y.add_(_f32(bias))
    if gelu is not None:
        y = F.gelu(y, approximate=gelu)
    return y.add_(_f32(residual)) if residual is not None else y


def f32_applies(device: torch.device, dtype: torch.dtype, backend: str) -> bool:
    """Whether a model on (device, dtype, backend) gets fp32 PackedWeights: fp32 on the CPU (torch backend), where
    kernels.py runs (one fp32 sum per output, k in order; 1.45x oneDNN's packed fp32 at 1 row)."""
    return device.type == "cpu" and dtype == torch.float32 and backend == "torch" and kernels.has_int8()


def _no_dense(t):
    raise RuntimeError("internal: a packed low-precision weight cannot give back its plain tensor; the plain consumer of "
                       "a shared tensor must be read before the packed one (checkpoint/weight_map.py's order)")


# ------------------------------------------------------------------------------------------------
# the op table of a net with PackedWeights: fp32 activations; the reference ops where no weight is packed
# ------------------------------------------------------------------------------------------------
def _f32(t):
    return t if t is None or t.dtype == torch.float32 else t.float()


def product(x, weight: PackedWeight, bias=None, residual=None, *, ln=None, gelu=None) -> torch.Tensor:
    """x [..., K] -> gelu?(LN?(x) @ weight.T + bias) + residual [..., N], fp32 (kernels.py, or the torch reference).
    ln: (weight, bias, eps) of a LayerNorm over K or None; gelu: None, "none" (erf form) or "tanh"."""
    x, bias, residual = _f32(x), _f32(bias), _f32(residual)
    if weight.packed:
        if ln is not None and (ln[0].dtype != torch.float32 or (ln[1] is not None and ln[1].dtype != torch.float32)):
            ln = (_f32(ln[0]), _f32(ln[1]), ln[2])
        return kernels.linear(x, weight.values, weight.shape[0], weight.scale, bias, residual, ln, gelu, GROUP)
    if ln is not None:
        x = F.layer_norm(x, (x.shape[-1],), _f32(ln[0]), _f32(ln[1]), ln[2])
    if not weight.is_int8:  # the kernel's rounding of the activations
        x = x.to(torch.bfloat16).float()
    y = F.linear(x, weight.dequantize(), bias)
    if gelu is not None:
        y = F.gelu(y, approximate=gelu)
    return y.add_(residual) if residual is not None else y


def linear(x, weight, bias):
    if type(weight) is PackedWeight:
        return product(x, weight, bias)
    return _onednn(x, weight, bias) if weight.is_mkldnn else ops.linear(x, weight, bias)


def linear_gelu(x, weight, bias, approximate: str):
    if type(weight) is PackedWeight:
        return product(x, weight, bias, gelu=approximate)
    return _onednn(x, weight, bias, gelu=approximate) if weight.is_mkldnn else ops.linear_gelu(x, weight, bias,
                                                                                               approximate)


def fused_linear(x, weight, bias=None, *, x_ln=None, gelu=None, residual=None, residual_ln=None):
    if type(weight) is not PackedWeight:
        if weight.is_mkldnn:
            x, residual = ops.fused_linear_inputs(_f32(x), _f32(residual), x_ln, residual_ln)
            return _onednn(x, weight, bias, gelu=gelu, residual=residual)
        return ops.fused_linear(x, weight, bias, x_ln=x_ln, gelu=gelu, residual=residual, residual_ln=residual_ln)
    if gelu not in (None, "none", "tanh"):
        raise ValueError(f"fused_linear: gelu must be None, 'none' or 'tanh', got {gelu!r}")
    if residual is not None and residual_ln is not None:
        residual = F.layer_norm(_f32(residual), (residual.shape[-1],), _f32(residual_ln[0]), _f32(residual_ln[1]),
                                residual_ln[2])
    return product(x, weight, bias, residual, ln=x_ln, gelu=gelu)


def layer_norm(x, weight, bias, eps):
    return F.layer_norm(_f32(x), (x.shape[-1],), _f32(weight), _f32(bias), eps)


def add_layer_norm(x, residual, weight, bias, eps):
    s = _f32(x) + _f32(residual)
    return F.layer_norm(s, (s.shape[-1],), _f32(weight), _f32(bias), eps), s


def attention(q, k, v, **kw):
    return ops.attention(_f32(q), _f32(k), _f32(v), **kw)


def varlen_attention(q, k, v, **kw):
    return ops.varlen_attention(_f32(q), _f32(k), _f32(v), **kw)


def decode_attention(q, k, v, *, scale: float, starts, lens, key_mask=None, k_new=None, v_new=None, max_len=None,
                     plan=None):
    """ops.decode_attention through kernels.py's (fp32 or bf16 keys read in place, one call for every row's window);
    the reference where the kernels are not available or a key mask is given."""
    if key_mask is not None or not kernels.has_int8() or k.dtype not in (torch.float32, torch.bfloat16):
        return ops.decode_attention(q, k, v, scale=scale, starts=starts, lens=lens, key_mask=key_mask, k_new=k_new,
                                    v_new=v_new, max_len=max_len, plan=plan)
    if plan is None:
        plan = ops.window_plan(starts, lens, k.shape[0])
    if k_new is not None:  # written by the kernel before it attends
        return kernels.decode_attention(_f32(q), k, v, *plan.windows, scale, _f32(k_new), _f32(v_new),
                                        plan.slots).to(q.dtype)
    return kernels.decode_attention(_f32(q), k, v, *plan.windows, scale).to(q.dtype)


TABLE = dataclasses.replace(ops.TORCH, name="torch+cpu-lowp", linear=linear, linear_gelu=linear_gelu,
                            fused_linear=fused_linear, layer_norm=layer_norm, add_layer_norm=add_layer_norm,
                            attention=attention, varlen_attention=varlen_attention, decode_attention=decode_attention,
                            decoder_step=step.decoder_step)

# what checkpoint.build_net applies as each weight is read
INT8 = WeightTransform(names=slot_names, tensor=to_int8, net=lambda net: pack_net(net, to_int8), dense=_no_dense)
BF16_ONEDNN_ENCODER = WeightTransform(names=lambda net: slot_names(net) - {f"{n}.weight" for n in encoder_slots(net)},
                                      tensor=to_bf16, net=pack_net_onednn_encoder, dense=lambda t: t.matrix().clone())
BF16 = WeightTransform(names=slot_names, tensor=to_bf16, net=lambda net: pack_net(net, to_bf16),
                       dense=lambda t: t.matrix().clone())
F32 = WeightTransform(names=slot_names, tensor=to_f32, net=lambda net: pack_net(net, to_f32),
                      dense=lambda t: t.matrix().clone())
INT8_PLAIN = WeightTransform(names=slot_names, tensor=to_int8_plain,
                             net=lambda net: pack_net(net, to_int8_plain, fp32_rest=False), dense=_no_dense)
