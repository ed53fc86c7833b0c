"""Assignment: every buffer of a net built on the meta device filled from a checkpoint source, tensor by
tensor, so that peak memory stays about one copy of the model. Each tensor is checked (floating point,
finite once cast, the shape the config implies); tied weights stay one tensor; what a glued pair lacks is
initialised from a seed; a WeightTransform (prepack.py's oneDNN layout) converts the projection weights
as they arrive, so that at most one plain copy of a converted weight is alive at a time.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import CheckpointError, InvalidInputError
from ..modules import EncoderDecoderNet, LayerNorm
from . import weight_map as wm
from .memory import MappedPages
from .sources import Source


@dataclass(frozen=True)
class WeightTransform:
    """A load-time change of the projection weights' storage: names(net) the buffers it applies to,
    tensor(t) one weight (a new tensor; t is left alone), net(module) every such buffer of a built net in
    place (what was initialised rather than read), dense(t) the plain tensor back."""

    names: Callable[[torch.nn.Module], frozenset]
    tensor: Callable[[torch.Tensor], torch.Tensor]
    net: Callable[[torch.nn.Module], None]
    dense: Callable[[torch.Tensor], torch.Tensor]


def _set_buffer(model: torch.nn.Module, name: str, value: torch.Tensor):
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    expected = mod._buffers[leaf]
    if tuple(expected.shape) != tuple(value.shape):
        raise CheckpointError(
            f"tensor for {name} has shape {tuple(value.shape)} but the config implies {tuple(expected.shape)}; "
            "config.json and the weights disagree: re-save the checkpoint with save_pretrained()."
        )
    mod._buffers[leaf] = value


def _floating(name: str, t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        raise CheckpointError(f"tensor {name} is stored as {t.dtype}; encdec_fast loads floating-point weights only "
                              "(float32, float16, bfloat16; quantised checkpoints are not supported). Re-save the "
                              "checkpoint with floating-point weights.")
    return t


def _finite(t: torch.Tensor) -> bool:
    """One pass and no tensor-sized temporary (load memory): min and max propagate NaN."""
    return bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def _nonfinite(names: list[str], parts: list[torch.Tensor], dtype) -> Exception:
    what = names[0] if len(names) == 1 else names
    if not all(_finite(p) for p in parts):
        return CheckpointError(f"tensor {what} holds NaN or inf values: the checkpoint is damaged (or its training "
                               f"diverged). Re-save good weights, or pass load(..., check_finite=False) to load it anyway.")
    big = max(float(p.abs().max()) for p in parts)
    return InvalidInputError(f"tensor {what} holds values up to {big:.3g}, beyond the range of {dtype}; load with "
                             "dtype=torch.bfloat16 or torch.float32.")



def assign(model, plan: wm.Plan, fetch: Callable[[str], torch.Tensor], *, device, dtype, check_finite: bool = True,
           transform: WeightTransform | None = None):
    """Fill every buffer of `model` (built on meta) from the plan. fetch(hf_name) returns a CPU tensor.
    Tensors listed under the same HF names are shared (tied weights stay one tensor). Every tensor must
    be floating point and, with check_finite, finite once cast to dtype. The buffers that `transform`
    names are converted as they arrive (a new tensor each), and the mapped pages of sources that were
    copied are given back (MappedPages)."""
    converted = transform.names(model) if transform is not None else frozenset()
    shared: dict = {}  # key -> the plain tensor, for buffers read plain (the word embeddings, tied)
    done: dict = {}  # key -> its converted tensor (tie_encoder_decoder: several projections, one tensor)
    pages = MappedPages()
    for ours, (hf_names, fn) in plan.items():
        key = wm.source_key(hf_names, fn)
        if key in shared or key in done:
            if ours in converted:
                if key not in done:  # an LM head tied to the word embeddings: its own converted copy
                    done[key] = transform.tensor(shared[key])
                _set_buffer(model, ours, done[key])
            else:
                if key not in shared:
                    shared[key] = transform.dense(done[key])
                _set_buffer(model, ours, shared[key])
            continue
        parts = [_floating(h, fetch(h)) for h in hf_names]
        t = fn(*parts).to(device=device, dtype=dtype).contiguous()
        if check_finite and not _finite(t):
            raise _nonfinite(hf_names, parts, dtype)
        new_storage = ours in converted
        if new_storage:
            _set_buffer(model, ours, t)  # checks the shape
            t = transform.tensor(t)
            if fn is wm.same:
                done[key] = t
        elif fn is wm.same:
            shared[key] = t
        _set_buffer(model, ours, t)
        freed = 0
        for p in parts:  # copied (or converted): its source is not needed
            if new_storage or p.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
                pages.release(p)
                freed += p.numel() * p.element_size()
        parts = p = None  # the sources (and a converted weight's plain tensor) are gone now
        pages.trim(freed)


def check_complete(model):
    left = [n for n, b in model.named_buffers() if b is not None and b.is_meta]
    if left:
        raise CheckpointError(f"internal: buffers left unassigned: {left[:5]}")




def _init_missing(net, plan: wm.Plan, missing: set[str], seed: int, std: float, dtype, device) -> list[str]:
    """Reproducibly initialise every buffer whose HF tensors are missing; returns the HF names."""
    g = torch.Generator().manual_seed(seed)
    done = []
    for ours, (hf_names, _) in plan.items():
        if not any(h in missing for h in hf_names):
            continue
        mod_name, _, leaf = ours.rpartition(".")
        mod = net.get_submodule(mod_name)
        shape = mod._buffers[leaf].shape
        if leaf == "bias":
            t = torch.zeros(shape)
        elif isinstance(mod, LayerNorm):
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=g) * std
        mod._buffers[leaf] = t.to(device=device, dtype=dtype)
        done += [h for h in hf_names if h in missing]
    return done


def build_net(src: Source, *, device, dtype, seed: int, check_finite: bool = True,
              transform: WeightTransform | None = None) -> EncoderDecoderNet:
    """The net on the meta device, then every buffer assigned from the checkpoint (or initialised); with a
    transform, its projection weights converted (prepack.py) as they are assigned."""
    with torch.device("meta"):
        net = EncoderDecoderNet(src.cfg)
    plan = src.plan
    if src.init_missing:
        dec = src.hf_config.decoder
        std = getattr(dec, "initializer_range", None) or getattr(dec, "init_std", None) or 0.02  # BART: init_std
        done = _init_missing(net, plan, src.init_missing, seed, std, dtype, device)
        plan = {k: v for k, v in plan.items() if not any(h in src.init_missing for h in v[0])}
        warnings.warn(
            f"the glued checkpoints lack {len(done)} tensors that only the combined model has (decoder "
            f"cross-attention, enc_to_dec_proj); initialised from seed {seed}. Fine-tune before use, as after "
            f"from_encoder_decoder_pretrained: {sorted(done)}", stacklevel=4)  # load() -> _build() -> build_net(): the caller of load()
    try:
        assign(net, plan, src.fetch, device=device, dtype=dtype, check_finite=check_finite, transform=transform)
    except KeyError as e:
        raise CheckpointError(f"tensor {e} is missing from the checkpoint; re-save it with save_pretrained().") from None
    check_complete(net)
    if src.cfg.decoder.tie_word_embeddings:
        net.tie_head()
    if transform is not None:  # the tensors initialised rather than read (a glued pair's cross-attention)
        transform.net(net)
    return net
