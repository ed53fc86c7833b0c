"""A whole decoder step on the CPU in one call of csrc/cpu_linear.cpp (encdec_cpu_decoder_step).

modules.Decoder.step runs a step as ~100 op-table calls (six products and two attentions a layer, then the LM
head); on packed weights each is a kernels.py call whose Python (argument checks, views, output allocation, the
ctypes call) costs 5-10 us, and the layers' own Python as much again: ~2 ms of a ~8 ms int8 step at one row
(bert-base + gpt2). This op makes the same kernel calls, in the same order on the same inputs, from C++: the
layers' products and attentions with their LayerNorms, biases, GELUs and residual adds, then the LM head.

The decoder's part that does not change between steps (weight pointers, LayerNorm and bias pointers, the layer
structure: which LayerNorm precedes which product in a pre-LN GPT-2 block or a post-LN BERT layer) is a Program
built once per decoder and kept on it; a step passes the caches, the windows and the embeddings.

decoder_step returns None (the caller then runs the op-table path) where the op does not apply: a projection
weight that is not packed for kernels.py, a GELU form the kernels lack, caches that are not fp32 or bf16 in the
state's layout. The numbers are the op-table path's: the same products; one difference, the post-LN layers'
residual LayerNorm is computed by the kernels' LayerNorm (the one the products' input LayerNorm uses) rather than
torch's (tests/test_cpu_step.py compares the two paths, and the parity tests compare tokens with transformers).
"""

from __future__ import annotations

import ctypes

import torch

from ..modules import _key_rows
from . import kernels

_p, _i64, _f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class StepLinear(ctypes.Structure):
    """csrc/cpu_linear.cpp's StepLinear: one product with its fused LayerNorm (ln), residual LayerNorm (rln) and GELU."""

    _fields_ = [("w", _p), ("scale", _p), ("kind", _i64), ("N", _i64), ("K", _i64), ("group", _i64), ("bias", _p),
                ("ln_w", _p), ("ln_b", _p), ("rln_w", _p), ("rln_b", _p), ("ln_eps", _f), ("rln_eps", _f),
                ("act", _i64)]


class StepLayer(ctypes.Structure):
    _fields_ = [("qkv", StepLinear), ("o", StepLinear), ("q", StepLinear), ("cross_o", StepLinear),
                ("fc1", StepLinear), ("fc2", StepLinear), ("self_scale", _f), ("cross_scale", _f)]


_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


class Program:
    """A decoder's layers and LM head as encdec_cpu_decoder_step reads them (pointers into tensors this object keeps)."""

    def __init__(self, decoder, packed_weight_type, group: int):
        cfg = decoder.cfg
        self.E, self.H = cfg.hidden_size, cfg.num_heads
        self.D = self.E // self.H
        self.V = decoder.head.weight.shape[0]
        self.keep: list[torch.Tensor] = []  # the fp32 copies the structs point into
        self._packed, self._group = packed_weight_type, group
        layers = list(decoder.layers)
        self.layers = (StepLayer * max(1, len(layers)))()
        self.n_layers = len(layers)
        prev = None  # post-LN: the LayerNorm of the previous layer's output, fused into this layer's first products
        for i, layer in enumerate(layers):
            s = self.layers[i]
            if cfg.pre_ln:
                s.qkv = self._linear(layer.attn.qkv, ln=layer.ln1)
                s.o = self._linear(layer.attn.o)
                s.q = self._linear(layer.cross.q, ln=layer.ln_cross)
                s.cross_o = self._linear(layer.cross.o)
                s.fc1 = self._linear(layer.mlp.fc1, ln=layer.ln2, act=layer.mlp.gelu)
                s.fc2 = self._linear(layer.mlp.fc2)
            else:
                s.qkv = self._linear(layer.attn.qkv, ln=prev)
                s.o = self._linear(layer.attn.o, rln=prev)
                s.q = self._linear(layer.cross.q, ln=layer.ln1)
                s.cross_o = self._linear(layer.cross.o, rln=layer.ln1)
                s.fc1 = self._linear(layer.mlp.fc1, ln=layer.ln_cross, act=layer.mlp.gelu)
                s.fc2 = self._linear(layer.mlp.fc2, rln=layer.ln_cross)
                prev = layer.ln2
            s.self_scale, s.cross_scale = layer.attn.scale, layer.cross.scale
        last = decoder.ln_f if cfg.pre_ln else prev
        head = decoder.head
        if cfg.head_transform:
            self.dense = self._linear(head.dense, ln=last, act=cfg.head_gelu)
            self.head = self._linear(head, ln=head.ln)
        else:
            self.dense = StepLinear()
            self.head = self._linear(head, ln=last)

    def _f32(self, t: torch.Tensor | None) -> int:
        if t is None:
            return 0
        t = t.detach().float().contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def _linear(self, m, *, ln=None, rln=None, act=None) -> StepLinear:
        w = m.weight
        if type(w) is not self._packed or not w.packed or w.values.dtype not in _KIND:
            raise _NotApplicable
        if act not in kernels.ACT:
            raise _NotApplicable
        s = StepLinear()
        s.w, s.kind = w.values.data_ptr(), _KIND[w.values.dtype]
        s.scale = w.scale.data_ptr() if w.scale is not None else 0
        s.N, s.K = w.shape
        s.group, s.bias, s.act = self._group, self._f32(m.bias), kernels.ACT[act]
        if ln is not None:
            s.ln_w, s.ln_b, s.ln_eps = self._f32(ln.weight), self._f32(ln.bias), ln.eps
        if rln is not None:
            s.rln_w, s.rln_b, s.rln_eps = self._f32(rln.weight), self._f32(rln.bias), rln.eps
        self.keep.append(w.values)
        if w.scale is not None:
            self.keep.append(w.scale)
        return s


class _NotApplicable(Exception):
    pass


_ATTR = "_cpu_step_program"


def program(decoder) -> Program | None:
    """The decoder's Program (built on first use and kept on the decoder until forget() drops it), or None when the
    op does not apply to it."""
    prog = decoder.__dict__.get(_ATTR, False)
    if prog is not False:
        return prog
    if kernels.library() is None:
        return None
    from . import weights  # (weights.py imports this module)

    try:
        prog = Program(decoder, weights.PackedWeight, weights.GROUP)
    except _NotApplicable:
        prog = None
    decoder.__dict__[_ATTR] = prog
    return prog


def forget(net) -> None:
    """Drop the Programs kept on net's decoders: their weights are being replaced (weights.pack_net / unpack_net,
    which every change of a loaded model's weights goes through)."""
    for m in net.modules():
        m.__dict__.pop(_ATTR, None)


def _layout(t: torch.Tensor, H: int, D: int) -> bool:
    """t [..., H, D] with key rows H * D apart (a cache or an arena in the state's layout)."""
    return t.stride()[-3:] == (H * D, D, 1)


def decoder_step(decoder, x, self_starts, seq_lens, cache, cross_kv, cross_starts, enc_lens):
    """modules.Decoder.step's layers and LM head in one call (see the module docstring): x [N, E] the rows' input
    embeddings; cache (k_caches, v_caches) per layer [N, L, H, D] (rows self_starts[1] key rows apart); cross_kv per
    layer packed (K, V) [T, H, D]. -> logits fp32 [N, V], or None where the op does not apply."""
    prog = program(decoder)
    if prog is None:
        return None
    ks, vs = cache
    N, E, H, D = x.shape[0], prog.E, prog.H, prog.D
    if (len(ks) != prog.n_layers or len(vs) != prog.n_layers or len(cross_kv) != prog.n_layers or x.dim() != 2
            or x.shape[1] != E or any(a.shape != (N,) for a in (self_starts, seq_lens, cross_starts, enc_lens))):
        return None  # the op-table path runs (and reports what is wrong)
    k0 = ks[0] if ks else None
    if k0 is not None:
        dt, ct, shape, cshape = k0.dtype, cross_kv[0][0].dtype, k0.shape, cross_kv[0][0].shape
        if dt not in (torch.float32, torch.bfloat16) or ct not in (torch.float32, torch.bfloat16):
            return None
        ptrs = []
        for k, v, (ck, cv) in zip(ks, vs, cross_kv):
            if (k.dtype != dt or v.dtype != dt or ck.dtype != ct or cv.dtype != ct or k.shape != shape
                    or v.shape != shape or ck.shape != cshape or cv.shape != cshape or v.stride() != k.stride()
                    or cv.stride() != ck.stride() or not (_layout(k, H, D) and _layout(ck, H, D))):
                return None
            ptrs += (k.data_ptr(), v.data_ptr(), ck.data_ptr(), cv.data_ptr())
        keys = _key_rows(k0)[0]  # the key rows self_starts count in (modules.Decoder.step's)
        t_self, kt, t_cross = keys.shape[0], keys.stride(0), cross_kv[0][0].shape[0]
    else:
        dt = ct = torch.float32
        ptrs, t_self, kt, t_cross = [], 0, E, 0
    x = x.float().contiguous()
    logits = torch.empty(N, prog.V, dtype=torch.float32)
    ss, sl = self_starts.long().contiguous(), seq_lens.long().contiguous()
    cs, cl = cross_starts.long().contiguous(), enc_lens.long().contiguous()
    code = kernels.library().encdec_cpu_decoder_step(
        prog.layers, prog.n_layers, ctypes.byref(prog.dense), ctypes.byref(prog.head), E, H, D, x.data_ptr(), N,
        (ctypes.c_void_p * max(1, len(ptrs)))(*ptrs), t_self, kt, int(dt == torch.bfloat16), t_cross,
        int(ct == torch.bfloat16), ss.data_ptr(), sl.data_ptr(), cs.data_ptr(), cl.data_ptr(), logits.data_ptr())
    if code:
        kernels._check(code, "decoder_step")
    return logits
