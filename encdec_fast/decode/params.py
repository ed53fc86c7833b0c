"""A request's generation settings, resolved once: what generate(), the Engine, the server and the CLI run.

    params = resolve(model, generation_config, kwargs, batch=B)

resolve() does what transformers' GenerationMixin.generate does before its first step (5.x): the
GenerationConfig from the argument config, model.generation_config, the global defaults and the keyword
arguments, in that order (_prepare_generation_config); the special tokens (_prepare_special_tokens); the
decoder prefix; the lengths (_prepare_generated_length, _validate_generated_length); and what runs on the
host (the streamer, stopping criteria, the caller's logits processors: decode/host.py's Host, None when
nothing does). Everything it cannot honour is refused here, with UnsupportedArgumentError, and every value
is checked (validate.py), so a GenParams holds only what the decode loop implements. The result is frozen:
nothing downstream changes a request's settings.
"""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass

import torch

from .. import validate
from ..errors import InvalidInputError, UnsupportedArgumentError
from . import host as host_mod
from . import select as sel

# generate() arguments of transformers that are not GenerationConfig fields: those that run on the host
# (decode/host.py), and those we do not implement
HOST_ARGS = ("streamer", "logits_processor", "stopping_criteria", "tokenizer")
CALL_ARGS = ("prefix_allowed_tokens_fn", "assistant_model", "negative_prompt_ids", "negative_prompt_attention_mask",
             "custom_generate", "assistant_tokenizer", "trust_remote_code", "synced_gpus")

# GenerationConfig fields we do not implement, with the values that leave them off
OFF_VALUES = {
    "use_mtp": (None, False), "min_p": (None,), "top_h": (None,),
    "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0),
    "encoder_repetition_penalty": (None, 1.0), "renormalize_logits": (None, False), "forced_bos_token_id": (None,),
    "remove_invalid_values": (None, False), "exponential_decay_length_penalty": (None,),
    "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "sequence_bias": (None,),
    "token_healing": (None, False), "guidance_scale": (None, 1.0), "watermarking_config": (None,),
    "output_attentions": (None, False), "output_hidden_states": (None, False),
    "encoder_no_repeat_ngram_size": (None, 0), "is_assistant": (None, False), "prompt_lookup_num_tokens": (None,),
    "assistant_early_exit": (None,), "continuous_batching_config": (None,), "low_memory": (None, False),
    "penalty_alpha": (None, 0.0), "dola_layers": (None,), "diversity_penalty": (None, 0.0),
    "num_beam_groups": (None, 1), "constraints": (None,), "force_words_ids": (None,),
}
# model kwargs (what GenerationConfig.update leaves over) that we take; token_type_ids go to the encoder
MODEL_KWARGS = ("decoder_input_ids", "token_type_ids")
# model kwargs of transformers' generate() that we refuse by name (UnsupportedArgumentError)
OTHER_MODEL_KWARGS = ("decoder_attention_mask", "encoder_outputs", "past_key_values", "inputs_embeds",
                      "decoder_inputs_embeds", "head_mask", "decoder_head_mask", "cross_attn_head_mask")


@dataclass(frozen=True)
class GenParams:
    """One generate() call's (or one Engine request's) settings, resolved.

    gc: the resolved GenerationConfig (lengths prepared; read it, never change it). select: the logits
    processors' per-row settings. eos: the eos ids (None: no eos). pad: the padding id finished rows are
    fed. prefix: (B, P) decoder prefix tokens (decoder start, then decoder_input_ids). fill: what token
    buffers hold past the prefix (transformers' value, which processors may read). token_type_ids: for
    the encoder, or None. host: what runs on the host (streamer, stopping criteria, the caller's logits
    processors: decode/host.py), or None."""

    gc: object
    select: sel.RowConfig
    eos: tuple[int, ...] | None
    pad: int | None
    prefix: torch.Tensor
    fill: int
    token_type_ids: object = None
    host: host_mod.Host | None = None

    @property
    def max_length(self) -> int:
        return self.gc.max_length

    @property
    def num_beams(self) -> int:
        return self.gc.num_beams or 1

    @property
    def num_return_sequences(self) -> int:
        return self.gc.num_return_sequences or 1

    @property
    def rows_per_input(self) -> int:
        """Decode rows one input takes: its beams, or its returned sequences."""
        return max(self.num_beams, self.num_return_sequences)

    @property
    def do_sample(self) -> bool:
        return bool(self.gc.do_sample)

    @property
    def prompt_len(self) -> int:
        return self.prefix.shape[1]

    @property
    def output_scores(self) -> bool:
        return bool(self.gc.return_dict_in_generate and self.gc.output_scores)

    @property
    def output_logits(self) -> bool:
        return bool(self.gc.return_dict_in_generate and self.gc.output_logits)


def resolve(model, generation_config=None, kwargs=None, *, batch: int = 1) -> GenParams:
    """The settings of a generate() call on `batch` inputs (see the module docstring)."""
    kwargs = dict(kwargs or {})
    call = {k: kwargs.pop(k) for k in HOST_ARGS if k in kwargs}
    gc, model_kwargs, has_default_max_length = resolve_config(model, generation_config, kwargs)
    V = model.cfg.decoder.vocab_size
    eos, pad, start = special_tokens(gc, batch, V)
    prefix = decoder_prefix(model, model_kwargs.get("decoder_input_ids"), start, batch)
    P = prefix.shape[1]
    prepare_lengths(model, gc, has_default_max_length, P)
    select = sel.RowConfig.from_generation_config(gc, prompt_len=P, eos=eos, pad=pad, vocab_size=V)
    rows = batch * max(gc.num_beams or 1, gc.num_return_sequences or 1)
    host = host_mod.resolve(gc, call, eos=eos, pad=pad, rows=rows)
    return GenParams(gc=gc, select=select, eos=tuple(eos) if eos is not None else None, pad=pad, prefix=prefix,
                     fill=fill_token(gc.num_beams or 1, pad, eos), token_type_ids=model_kwargs.get("token_type_ids"),
                     host=host)


# ------------------------------------------------------------------------------------------------
# transformers' _prepare_generation_config / _prepare_special_tokens / lengths
# ------------------------------------------------------------------------------------------------
def _refuse(names, where: str):
    names = sorted(names)
    if names:
        raise UnsupportedArgumentError(
            f"generate() does not support {', '.join(names)} ({where}); encdec_fast implements greedy, sampling "
            "(temperature, top_k, top_p) and beam search with repetition_penalty, no_repeat_ngram_size, bad_words_ids, "
            "min_length/min_new_tokens, forced_eos_token_id, length_penalty, early_stopping, num_return_sequences, "
            "output_scores/output_logits, max_time, stop_strings, streamer, stopping_criteria and logits_processor. "
            "Use transformers' generate() for the rest.")


def _known_kwargs(kwargs: dict) -> dict:
    """kwargs without unknown names set to None (transformers ignores those too); an unknown name with a
    value is refused. Known: GenerationConfig fields (the keys of its to_dict(), private ones excepted),
    transformers' generate() arguments and model kwargs. GenerationConfig.update() would set any other
    attribute that exists on the object (to_dict, __dict__) and take allow_custom_entries as its own."""
    known = _generation_fields().union(CALL_ARGS, MODEL_KWARGS, OTHER_MODEL_KWARGS)
    unknown = [k for k in kwargs if k not in known and kwargs[k] is not None]
    if unknown:
        raise UnsupportedArgumentError(
            f"generate() got unknown argument(s) {', '.join(sorted(map(repr, unknown)))}; it takes GenerationConfig "
            "fields (max_new_tokens, num_beams, do_sample, ...) and input_ids/attention_mask/decoder_input_ids. "
            "Check the spelling.")
    return {k: v for k, v in kwargs.items() if k in known}


@functools.cache
def _generation_fields() -> frozenset:
    from transformers import GenerationConfig

    return frozenset(k for k in GenerationConfig().to_dict() if not k.startswith("_"))


def resolve_config(model, generation_config=None, kwargs=None):
    """-> (GenerationConfig, model kwargs, has_default_max_length), as GenerationMixin resolves them."""
    from transformers import GenerationConfig

    kwargs = _known_kwargs(dict(kwargs or {}))
    _refuse([k for k in CALL_ARGS if kwargs.get(k) is not None and kwargs.get(k) is not False],
            "a transformers generate() argument")
    for k in CALL_ARGS:
        kwargs.pop(k, None)
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise InvalidInputError(f"generation_config must be a transformers GenerationConfig, got "
                                f"{type(generation_config).__name__}; pass options as keyword arguments instead.")
    base = model.generation_config if model.generation_config is not None else GenerationConfig()
    base_values = base.to_dict()
    # every source, before transformers compares its values (a str where an int belongs raises TypeError there)
    validate.generation_values(base_values, "model.generation_config.")
    if generation_config is not None:
        validate.generation_values(generation_config.to_dict(), "generation_config.")
    validate.generation_values(kwargs)
    has_default_max_length = (kwargs.get("max_length") is None
                              and (generation_config is None or generation_config.max_length is None)
                              and base.max_length is None)
    try:
        gc = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
        gc.update(**base_values, defaults_only=True, allow_custom_entries=True)
        gc.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
        model_kwargs = gc.update(**kwargs)
    except (ValueError, TypeError) as e:
        raise InvalidInputError(f"invalid generation argument: {e}") from None
    _refuse([k for k in model_kwargs if k not in MODEL_KWARGS and model_kwargs[k] is not None], "unknown or model argument")
    _refuse([k for k, off in OFF_VALUES.items() if getattr(gc, k, None) not in off], "generation option")
    validate.generation(gc, model.cfg.decoder.vocab_size)
    return gc, model_kwargs, has_default_max_length


def as_list(x) -> list[int] | None:
    """int, list of ints or tensor (types checked by validate.generation_values) -> list of ints; None stays None."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    return [int(x)] if not isinstance(x, (list, tuple)) else [int(i) for i in x]


def special_tokens(gc, batch: int, vocab_size: int):
    """-> (eos list or None, pad int or None, decoder start (B, 1) list-able), as _prepare_special_tokens;
    the decoder start and the padding id are checked against the vocabulary (the decoder is fed them)."""
    eos = as_list(gc.eos_token_id)
    if eos is not None and min(eos) < 0:
        raise InvalidInputError(f"eos_token_id holds {min(eos)}, not a token id; pass ids >= 0 (or None).")
    pad = gc.pad_token_id
    if isinstance(pad, torch.Tensor):
        pad = int(pad)
    if pad is not None:
        pad = validate.special_id(pad, "pad_token_id", vocab_size)
    start = gc.decoder_start_token_id if gc.decoder_start_token_id is not None else gc.bos_token_id
    if start is None:
        raise InvalidInputError(
            "no decoder_start_token_id: neither generation_config.decoder_start_token_id nor bos_token_id is set. "
            "Pass decoder_start_token_id=... to generate(), or set model.generation_config.decoder_start_token_id.")
    start = [validate.special_id(s, "decoder_start_token_id", vocab_size) for s in as_list(start)]
    if len(start) == 1:
        start = start * batch
    elif len(start) != batch:
        raise InvalidInputError(f"decoder_start_token_id has {len(start)} entries but the batch has {batch} rows.")
    if pad is None and eos is not None:
        warnings.warn(f"pad_token_id is not set: finished sequences are padded with eos_token_id {eos[0]} "
                      "(as transformers does). Set pad_token_id to silence this.", stacklevel=4)
        pad = eos[0]
        if any(0 <= e < vocab_size for e in eos):  # rows can finish, and are then fed the padding id
            validate.special_id(pad, "pad_token_id (unset, so eos_token_id[0])", vocab_size)
    return eos, pad, start


def decoder_prefix(model, decoder_input_ids, start: list[int], batch: int) -> torch.Tensor:
    """(B, P): decoder_start, or the given prefix with decoder_start prepended when no row starts with it."""
    start_t = torch.tensor(start, dtype=torch.long, device=model.device).view(-1, 1)
    if decoder_input_ids is None:
        return start_t
    dec = validate.token_ids(decoder_input_ids, "decoder_input_ids", model.cfg.decoder).to(model.device)
    if dec.shape[0] != batch:
        raise InvalidInputError(f"decoder_input_ids has batch {dec.shape[0]} but input_ids has {batch}; they must match.")
    if bool((dec[:, 0] != start_t[:, 0]).all()):
        dec = torch.cat([start_t, dec], dim=1)
    return dec


def prepare_lengths(model, gc, has_default_max_length: bool, P: int):
    """transformers' _prepare_generated_length and _validate_generated_length, plus our position check."""
    if gc.max_new_tokens is not None:
        gc.max_length = gc.max_new_tokens + P
    elif has_default_max_length:
        gc.max_length = gc.max_length + P
        mpe = getattr(model.config, "max_position_embeddings", None)
        if mpe is not None:
            gc.max_length = min(gc.max_length, mpe)
    if gc.min_new_tokens is not None:
        gc.min_length = gc.min_new_tokens + P
    if has_default_max_length and gc.max_new_tokens is None:
        warnings.warn(f"Using the model-agnostic default `max_length` (={gc.max_length}) to control the generation "
                      "length. We recommend setting `max_new_tokens` to control the maximum length of the generation.",
                      UserWarning, stacklevel=4)
    validate.generation_length(gc.max_length, P, model.cfg.decoder.max_length)


def fill_token(num_beams: int, pad: int | None, eos: list[int] | None) -> int:
    """What transformers' token buffers hold past the prefix: pad for greedy/sampling; for beam search
    `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1` (pad 0 counts as unset)."""
    if num_beams == 1:
        return pad if pad is not None else 0
    return (pad if pad else eos[0]) if eos is not None else -1
