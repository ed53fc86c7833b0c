"""Checkpoint sources: what load() reads, resolved to our buffer names. One EncoderDecoderModel folder (a
tied checkpoint's decoder borrowing the encoder's tensors), an encoder and a decoder checkpoint glued like
``from_encoder_decoder_pretrained``, or a transformers model in memory; each gives its configs, the plan
(weight_map.py) and a fetch(Hugging Face name) -> CPU tensor, with every missing or unexpected tensor
reported before anything is read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import validate
from ..config import ModelConfig, from_hf
from ..errors import CheckpointError, InvalidInputError, UnsupportedModelError
from . import weight_map as wm
from .files import RESAVE, WeightReader, folder, read_json

try:  # transformers 5 checks config fields through huggingface_hub's strict dataclasses
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # pragma: no cover
    StrictDataclassError = ()


@dataclass
class Source:
    """A checkpoint resolved to our names: its configs, the plan, and a fetch(HF name) -> CPU tensor."""

    hf_config: object  # transformers EncoderDecoderConfig
    cfg: ModelConfig
    plan: wm.Plan
    fetch: Callable[[str], torch.Tensor]
    stored_dtype: torch.dtype
    gen_dir: Path | None  # where generation_config.json is looked for (None: in memory)
    folder: Path | None  # the EncoderDecoderModel folder (None when glued or in memory)
    init_missing: set[str] = field(default_factory=set)  # HF names only the glued model has
    gen_config: object = None  # the in-memory model's GenerationConfig


def read_config(path: Path):
    from transformers import AutoConfig

    file = path / "config.json"
    validate.config_fields(read_json(file), str(file))
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (StrictDataclassError, TypeError) as e:  # a field of the wrong type that our table does not know
        msg = " ".join(str(e).split())
        raise CheckpointError(f"{str(file)!r}: {msg}; fix the file or {RESAVE}.") from None
    except (ValueError, KeyError, OSError) as e:
        raise UnsupportedModelError(
            f"cannot read {str(path / 'config.json')!r} as a transformers config: {e}. "
            "encdec_fast reads EncoderDecoderModel folders (see the README's supported checkpoints)."
        ) from None


def open_folder(path) -> Source:
    """An EncoderDecoderModel folder written by save_pretrained()."""
    root = folder(path)
    hf = read_config(root)
    if getattr(hf, "model_type", None) != "encoder-decoder":
        raise UnsupportedModelError(
            f"{str(root)!r} holds a {getattr(hf, 'model_type', '?')!r} model, not an EncoderDecoderModel. "
            "Load encoder and decoder checkpoints separately with load(encoder=..., decoder=...), or use "
            "transformers for native seq2seq models (T5, BART, ...).")
    cfg = from_hf(hf)
    reader = WeightReader(root)
    keys = reader.keys()
    plan = wm.full_plan(cfg, keys)
    names, tied = keys, {}
    if cfg.tie_encoder_decoder:  # checkpoints saved with tied halves drop the decoder's copies
        base = "decoder." + wm.DECODER_BASE[cfg.decoder.family]
        tied = {base + k[len("encoder."):]: k for k in keys if k.startswith("encoder.")}
        names = keys | set(tied)

    def resolve(n):  # the stored name of a tensor (a tied decoder's tensors are the encoder's)
        return n if n in keys else tied.get(n, n)

    def fetch(n):
        return reader.get(resolve(n))

    missing, unexpected = wm.missing_and_unexpected(plan, names)
    report_missing(str(root), missing, unexpected)
    dtype = reader.dtype()
    reader.expect(resolve(n) for n in _reads(plan))
    return Source(hf, cfg, plan, fetch, dtype, root, root)


def open_pair(encoder, decoder) -> Source:
    """An encoder and a decoder checkpoint glued like EncoderDecoderModel.from_encoder_decoder_pretrained."""
    from transformers import EncoderDecoderConfig

    ef, df = folder(encoder), folder(decoder)
    ecfg, dcfg = read_config(ef), read_config(df)
    for c, role in ((ecfg, "encoder"), (dcfg, "decoder")):
        if getattr(c, "model_type", None) == "encoder-decoder":
            raise InvalidInputError(f"{role}= got an EncoderDecoderModel folder; pass it as load(path).")
    dcfg.is_decoder, dcfg.add_cross_attention = True, True
    hf = EncoderDecoderConfig.from_encoder_decoder_configs(ecfg, dcfg)
    cfg = from_hf(hf)
    er, dr = WeightReader(ef), WeightReader(df)
    base = wm.DECODER_BASE[cfg.decoder.family]
    if cfg.decoder.family == "bart" and any(k.startswith(("model.encoder.", "encoder.")) for k in dr.keys()):
        raise UnsupportedModelError(
            f"decoder {str(df)!r} holds a whole BART model (encoder and decoder); transformers 5 loads it into "
            "BartForCausalLM without its word embeddings (they come out random). Build a BartForCausalLM with the "
            "decoder's weights and the shared embeddings, save it, and pass that folder as decoder=.")
    ealias = wm.alias(er.keys(), wm.ENCODER_BASES, "encoder.", wm.ENCODER_HEADS, "encoder.")
    dalias = wm.alias(dr.keys(), (base,), "decoder." + base, wm.DECODER_HEADS, "decoder.")
    names = set(ealias) | set(dalias)
    plan = wm.full_plan(cfg, names)
    missing, unexpected = wm.missing_and_unexpected(plan, names)
    unexpected = [u for u in unexpected if not u.startswith(tuple("encoder." + h for h in wm.ENCODER_HEADS))]
    enc_missing = [m for m in missing if not m.startswith(("decoder.", "enc_to_dec_proj."))]
    report_missing(f"encoder {str(ef)!r} / decoder {str(df)!r}", enc_missing, unexpected)

    def fetch(n):
        return er.get(ealias[n]) if n in ealias else dr.get(dalias[n])

    dtype = er.dtype()
    reads = _reads(plan)
    er.expect(ealias[n] for n in reads if n in ealias)
    dr.expect(dalias[n] for n in reads if n not in ealias and n in dalias)
    return Source(hf, cfg, plan, fetch, dtype, df, None, set(missing))


def _reads(plan: wm.Plan) -> list[str]:
    """The HF names assign() fetches, once per read: a source shared by several buffers (wm.same) is read
    once, any other as often as a buffer uses it (_shared_key)."""
    seen, out = set(), []
    for hf_names, fn in plan.values():
        key = wm.source_key(hf_names, fn)
        if fn is not wm.same or key not in seen:
            seen.add(key)
            out.extend(hf_names)
    return out


def open_module(model) -> Source:
    """A transformers EncoderDecoderModel in memory (for example right after fine-tuning), read through
    the same plan as its save_pretrained() folder. Every tensor is copied: the net shares no storage with
    the model, and later changes to either leave the other alone."""
    from transformers import EncoderDecoderModel

    if not isinstance(model, EncoderDecoderModel):
        raise UnsupportedModelError(
            f"from_transformers() takes a transformers EncoderDecoderModel, got {type(model).__name__}; for a "
            "folder use encdec_fast.load(path).")
    hf = copy.deepcopy(model.config)
    cfg = from_hf(hf)
    sd = model.state_dict()
    on_meta = sorted(k for k, t in sd.items() if t.is_meta)
    if on_meta:
        raise CheckpointError(f"the model holds tensors on the meta device ({on_meta[:3]}...): it is offloaded or was "
                              "never materialised. Load it fully into memory first, or save it and use load(path).")
    keys = set(sd)
    plan = wm.full_plan(cfg, keys)
    missing, unexpected = wm.missing_and_unexpected(plan, keys)
    report_missing(f"transformers model {type(model).__name__}", missing, unexpected)

    def fetch(n):  # a clone: nothing may share storage with the caller's model
        return sd[n].detach().clone()

    dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
    return Source(hf, cfg, plan, fetch, dtype, None, None, gen_config=copy.deepcopy(model.generation_config))




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



def generation_config(src: Source):
    """The checkpoint's generation_config.json, else one derived from config.json (as transformers does)."""
    from transformers import GenerationConfig

    if src.gen_dir is None:
        return copy.deepcopy(src.gen_config) if src.gen_config is not None else GenerationConfig.from_model_config(src.hf_config)
    f = src.gen_dir / "generation_config.json"
    own = f.is_file()
    where = f if own else src.gen_dir / "config.json"  # without the file, the values come from config.json
    fix = f"fix or delete {str(f)!r}" if own else f"fix {str(where)!r}"
    try:
        if own:
            validate.generation_values(read_json(f), f"{str(f)!r}: ", CheckpointError, fix)
            gc = GenerationConfig.from_pretrained(str(src.gen_dir), local_files_only=True)
        else:
            gc = GenerationConfig.from_model_config(src.hf_config)
    except CheckpointError:
        raise
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read {str(where)!r}: {e}; {fix}.") from None
    validate.generation_values(gc.to_dict(), f"{str(where)!r}: ", CheckpointError, fix)
    return gc
