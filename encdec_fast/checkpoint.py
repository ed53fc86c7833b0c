"""Find and read checkpoint weights, map Hugging Face names onto ours, validate every shape.

Weights are read lazily (safetensors ``safe_open``; ``.bin`` only through
``torch.load(weights_only=True, mmap=True)``) and assigned tensor by tensor into modules built on the
meta device, so peak memory stays about one copy of the model.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable

import torch

from .config import HalfConfig, ModelConfig
from .errors import CheckpointError, CheckpointNotFoundError

SAFE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

# tensors a checkpoint may hold that the inference graph does not use
_IGNORED_SUFFIXES = (".position_ids", ".token_type_ids", "attn.bias", "attn.masked_bias",
                     "crossattention.bias", "crossattention.masked_bias")
_IGNORED_PARTS = ("pooler.", "cls.seq_relationship.", "lm_head.decoder.bias", "cls.predictions.decoder.bias")


def folder(path) -> Path:
    if path is None:
        raise CheckpointNotFoundError("no checkpoint path given; pass the folder a model was saved to with save_pretrained().")
    p = Path(os.fspath(path)).expanduser()
    if not p.is_dir():
        raise CheckpointNotFoundError(
            f"checkpoint folder {str(p)!r} does not exist (or is not a folder); pass the folder written by "
            "save_pretrained(), which holds config.json and the weights. Hub names are not downloaded."
        )
    if not (p / "config.json").is_file():
        raise CheckpointNotFoundError(f"{str(p)!r} has no config.json; pass the folder written by save_pretrained().")
    return p


class WeightReader:
    """Lazy access to a folder's tensors by name, whatever the file layout."""

    def __init__(self, path: Path):
        self.path = path
        self._where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        if (path / SAFE).is_file():
            self._index_file(path / SAFE)
        elif (path / SAFE_INDEX).is_file():
            self._index_json(path / SAFE_INDEX)
        elif (path / BIN).is_file():
            self._index_file(path / BIN)
        elif (path / BIN_INDEX).is_file():
            self._index_json(path / BIN_INDEX)
        else:
            raise CheckpointNotFoundError(
                f"{str(path)!r} holds no weights: expected {SAFE}, {SAFE_INDEX}, {BIN} or {BIN_INDEX}. "
                "Save the model with save_pretrained() into this folder."
            )

    def _index_json(self, index: Path):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{str(index)!r} is not a valid shard index ({e}); re-save the checkpoint.") from None
        for name, shard in weight_map.items():
            f = index.parent / shard
            if not f.is_file():
                raise CheckpointNotFoundError(f"shard {shard!r} listed in {index.name} is missing from {str(index.parent)!r}.")
            self._where[name] = f

    def _handle(self, f: Path):
        if f not in self._open:
            try:
                if f.suffix == ".safetensors":
                    from safetensors import safe_open

                    self._open[f] = safe_open(str(f), framework="pt", device="cpu")
                else:
                    self._open[f] = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # corrupt file: say which
                raise CheckpointError(f"cannot read weights file {str(f)!r}: {e}. Re-save the checkpoint.") from None
        return self._open[f]

    def _index_file(self, f: Path):
        h = self._handle(f)
        for name in h.keys():
            self._where[name] = f

    def keys(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        h = self._handle(self._where[name])
        return h.get_tensor(name) if hasattr(h, "get_tensor") else h[name]

    def dtype(self) -> torch.dtype:
        for name in self._where:
            t = self.get(name)
            if t.is_floating_point():
                return t.dtype
        return torch.float32


# ------------------------------------------------------------------------------------------------
# name table: our buffer name -> (HF names, how to combine them)
# ------------------------------------------------------------------------------------------------
def _cat(*ts):
    return torch.cat(ts, 0)


def _t(t):  # GPT-2 Conv1D [in, out] -> nn.Linear [out, in]
    return t.t()


def _row0(t):
    return t[0]


Plan = dict[str, tuple[list[str], Callable]]


def _linear(plan: Plan, ours: str, hf: list[str], fn=None):
    if fn is None:
        fn = _cat if len(hf) > 1 else (lambda t: t)
    plan[f"{ours}.weight"] = ([f"{h}.weight" for h in hf], fn)
    plan[f"{ours}.bias"] = ([f"{h}.bias" for h in hf], _cat if len(hf) > 1 else (lambda t: t))


def _ln(plan: Plan, ours: str, hf: str):
    plan[f"{ours}.weight"] = ([f"{hf}.weight"], lambda t: t)
    plan[f"{ours}.bias"] = ([f"{hf}.bias"], lambda t: t)


def _bert_plan(cfg: HalfConfig, ours: str, base: str) -> Plan:
    """BERT/RoBERTa body. base: HF prefix of the base model ("encoder." or "decoder.bert.")."""
    plan: Plan = {}
    e = f"{base}embeddings."
    plan[f"{ours}embed.word"] = ([e + "word_embeddings.weight"], lambda t: t)
    plan[f"{ours}embed.position"] = ([e + "position_embeddings.weight"], lambda t: t)
    plan[f"{ours}embed.type0"] = ([e + "token_type_embeddings.weight"], _row0)
    _ln(plan, f"{ours}embed.ln", e + "LayerNorm")
    for i in range(cfg.num_layers):
        L, o = f"{base}encoder.layer.{i}.", f"{ours}layers.{i}."
        _linear(plan, o + "attn.qkv", [L + "attention.self.query", L + "attention.self.key", L + "attention.self.value"])
        _linear(plan, o + "attn.o", [L + "attention.output.dense"])
        _ln(plan, o + "ln1", L + "attention.output.LayerNorm")
        if cfg.cross_attention:
            _linear(plan, o + "cross.q", [L + "crossattention.self.query"])
            _linear(plan, o + "cross.kv", [L + "crossattention.self.key", L + "crossattention.self.value"])
            _linear(plan, o + "cross.o", [L + "crossattention.output.dense"])
            _ln(plan, o + "ln_cross", L + "crossattention.output.LayerNorm")
        _linear(plan, o + "mlp.fc1", [L + "intermediate.dense"])
        _linear(plan, o + "mlp.fc2", [L + "output.dense"])
        _ln(plan, o + "ln2", L + "output.LayerNorm")
    return plan


def _gpt2_plan(cfg: HalfConfig, ours: str, base: str) -> Plan:
    plan: Plan = {}
    plan[f"{ours}embed.word"] = ([base + "wte.weight"], lambda t: t)
    plan[f"{ours}embed.position"] = ([base + "wpe.weight"], lambda t: t)
    for i in range(cfg.num_layers):
        L, o = f"{base}h.{i}.", f"{ours}layers.{i}."
        _ln(plan, o + "ln1", L + "ln_1")
        _linear(plan, o + "attn.qkv", [L + "attn.c_attn"], _t)
        _linear(plan, o + "attn.o", [L + "attn.c_proj"], _t)
        _ln(plan, o + "ln_cross", L + "ln_cross_attn")
        _linear(plan, o + "cross.q", [L + "crossattention.q_attn"], _t)
        _linear(plan, o + "cross.kv", [L + "crossattention.c_attn"], _t)
        _linear(plan, o + "cross.o", [L + "crossattention.c_proj"], _t)
        _ln(plan, o + "ln2", L + "ln_2")
        _linear(plan, o + "mlp.fc1", [L + "mlp.c_fc"], _t)
        _linear(plan, o + "mlp.fc2", [L + "mlp.c_proj"], _t)
    _ln(plan, f"{ours}ln_f", base + "ln_f")
    return plan


def decoder_plan(cfg: HalfConfig, prefix: str) -> tuple[Plan, str, str]:
    """The decoder's plan, plus the HF names of its own LM-head matrix and of the word embeddings."""
    if cfg.family == "gpt2":
        plan = _gpt2_plan(cfg, "decoder.", prefix + "transformer.")
        return plan, prefix + "lm_head.weight", prefix + "transformer.wte.weight"
    fam = cfg.family
    plan = _bert_plan(cfg, "decoder.", f"{prefix}{fam}.")
    head = f"{prefix}cls.predictions." if fam == "bert" else f"{prefix}lm_head."
    if fam == "bert":
        _linear(plan, "decoder.head.dense", [head + "transform.dense"])
        _ln(plan, "decoder.head.ln", head + "transform.LayerNorm")
    else:
        _linear(plan, "decoder.head.dense", [head + "dense"])
        _ln(plan, "decoder.head.ln", head + "layer_norm")
    plan["decoder.head.bias"] = ([head + "bias"], lambda t: t)
    return plan, head + "decoder.weight", f"{prefix}{fam}.embeddings.word_embeddings.weight"


def full_plan(cfg: ModelConfig, keys: set[str], enc_prefix="encoder.", dec_prefix="decoder.") -> Plan:
    plan = _bert_plan(cfg.encoder, "encoder.", enc_prefix)
    dplan, head_w, word_w = decoder_plan(cfg.decoder, dec_prefix)
    plan.update(dplan)
    # transformers 5 keeps a head matrix stored in the checkpoint even when the config ties it (the
    # loader shares the two tensors again when they are equal); only a missing one is tied
    if head_w in keys or not cfg.decoder.tie_word_embeddings:
        plan["decoder.head.weight"] = ([head_w], lambda t: t)
    else:
        plan["decoder.head.weight"] = ([word_w], lambda t: t)
    if cfg.has_enc_to_dec_proj:
        _linear(plan, "enc_to_dec_proj", ["enc_to_dec_proj"])
    return plan


def ignorable(name: str) -> bool:
    return name.endswith(_IGNORED_SUFFIXES) or any(p in name for p in _IGNORED_PARTS)


# ------------------------------------------------------------------------------------------------
# assignment
# ------------------------------------------------------------------------------------------------
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


def assign(model, plan: Plan, fetch: Callable[[str], torch.Tensor], *, device, dtype, shared: dict | None = None):
    """Fill every buffer of `model` (built on meta) from the plan. fetch(hf_name) returns a CPU tensor.
    Tensors listed under the same HF names are shared (tied weights stay one tensor)."""
    shared = {} if shared is None else shared
    for ours, (hf_names, fn) in plan.items():
        key = (tuple(hf_names), fn.__name__)
        if key in shared:
            _set_buffer(model, ours, shared[key])
            continue
        t = fn(*[fetch(h) for h in hf_names])
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype).contiguous()
        _set_buffer(model, ours, t)
        if fn.__name__ == "<lambda>" and len(hf_names) == 1:
            shared[key] = t


def share_tied_head(model):
    """One tensor for the word embeddings and an LM head stored equal to them (memory, not numbers)."""
    dec = model.decoder
    w, h = dec.embed.word, dec.head.weight
    if w is not h and w.shape == h.shape and torch.equal(w, h):
        dec.head._buffers["weight"] = w


def check_complete(model):
    left = [n for n, b in model.named_buffers() if b is not None and b.is_meta]
    if left:
        raise CheckpointError(f"internal: buffers left unassigned: {left[:5]}")


def missing_and_unexpected(plan: Plan, keys: set[str], cfg: ModelConfig, dec_prefix="decoder.") -> tuple[list[str], list[str]]:
    needed = {h for names, _ in plan.values() for h in names}
    missing = sorted(needed - keys)
    unexpected = sorted(k for k in keys - needed if not ignorable(k))
    return missing, unexpected


def report_missing(where: str, missing: list[str], unexpected: list[str]):
    msg = []
    if missing:
        more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
        msg.append(f"missing tensors {missing[:10]}{more}")
    if unexpected:
        more = f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""
        msg.append(f"unexpected tensors {unexpected[:10]}{more}")
    if msg:
        raise CheckpointError(
            f"{where}: {'; '.join(msg)}. The weights do not match config.json; re-save the model with "
            "save_pretrained() (or load encoder and decoder checkpoints separately with load(encoder=..., decoder=...))."
        )


def warn(msg: str):
    warnings.warn(msg, stacklevel=3)
