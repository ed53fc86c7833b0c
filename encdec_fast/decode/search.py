"""generate(): greedy, sampling, beam search (and beam sampling), as transformers 5.x does them.

generate() takes transformers' arguments and returns what EncoderDecoderModel.generate returns, token
for token. The work per call:

  1. resolve the GenerationConfig exactly as GenerationMixin.generate does (argument config, then
     model.generation_config, then the global defaults, then kwargs; special tokens; lengths);
  2. run the encoder once, project each decoder layer's cross-attention K/V once (encoder rows only:
     beams and num_return_sequences point at their encoder row through kv_index, nothing is copied);
  3. run decode/state.py's step (the one the Engine runs too: decoder, processors, token choice, beam
     bookkeeping, all on the device) until every row has stopped.

The host looks at the finished flags only every `stop_check_every` steps (1 on CPU, where a look
costs nothing and an extra step costs a whole step; 16 on GPUs). The state records the step at which
every row had stopped, so a late look still returns what transformers returns: the steps run past it
only append padding, which is cut off, and their scores are dropped.
"""

from __future__ import annotations

import copy
import functools
import warnings

import torch

from .. import validate
from ..errors import InvalidInputError, UnsupportedArgumentError
from . import select as sel
from .state import DecodeState

# generate() arguments of transformers that are not GenerationConfig fields; we implement none of them
_CALL_ARGS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model", "streamer",
              "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate", "tokenizer",
              "assistant_tokenizer", "trust_remote_code", "synced_gpus")

# GenerationConfig fields we do not implement, with the values that leave them off
_OFF_VALUES = {
    "max_time": (None,), "stop_strings": (None,), "use_mtp": (None, False), "min_p": (None,), "top_h": (None,),
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
_MODEL_KWARGS = ("decoder_input_ids", "token_type_ids")
# model kwargs of transformers' generate() that we refuse by name (UnsupportedArgumentError)
_OTHER_MODEL_KWARGS = ("decoder_attention_mask", "encoder_outputs", "past_key_values", "inputs_embeds",
                       "decoder_inputs_embeds", "head_mask", "decoder_head_mask", "cross_attn_head_mask")


# ------------------------------------------------------------------------------------------------
# configuration: transformers' _prepare_generation_config / _prepare_special_tokens / lengths
# ------------------------------------------------------------------------------------------------
def _refuse(names, where: str):
    names = sorted(names)
    if names:
        raise UnsupportedArgumentError(
            f"generate() does not support {', '.join(names)} ({where}); encdec_fast implements greedy, sampling "
            "(temperature, top_k, top_p) and beam search with repetition_penalty, no_repeat_ngram_size, bad_words_ids, "
            "min_length/min_new_tokens, forced_eos_token_id, length_penalty, early_stopping, num_return_sequences, "
            "output_scores/output_logits. Use transformers' generate() for the rest.")


def _known_kwargs(kwargs: dict) -> dict:
    """kwargs without unknown names set to None (transformers ignores those too); an unknown name with a
    value is refused. Known: GenerationConfig fields (the keys of its to_dict(), private ones excepted),
    transformers' generate() arguments and model kwargs. GenerationConfig.update() would set any other
    attribute that exists on the object (to_dict, __dict__) and take allow_custom_entries as its own."""
    known = _generation_fields().union(_CALL_ARGS, _MODEL_KWARGS, _OTHER_MODEL_KWARGS)
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
    _refuse([k for k in _CALL_ARGS if kwargs.get(k) not in (None, False)], "a transformers generate() argument")
    for k in _CALL_ARGS:
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
    _refuse([k for k in model_kwargs if k not in _MODEL_KWARGS and model_kwargs[k] is not None], "unknown or model argument")
    _refuse([k for k, off in _OFF_VALUES.items() if getattr(gc, k, None) not in off], "generation option")
    validate.generation(gc, model.cfg.decoder.vocab_size)
    return gc, model_kwargs, has_default_max_length


def _as_list(x) -> list[int] | None:
    """int, list of ints or tensor (types checked by validate.generation_values) -> list of ints; None stays None."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    return [int(x)] if not isinstance(x, (list, tuple)) else [int(i) for i in x]


def special_tokens(gc, batch: int, vocab_size: int):
    """-> (eos list or None, pad int or None, decoder start (B, 1) list-able), as _prepare_special_tokens;
    the decoder start and the padding id are checked against the vocabulary (the decoder is fed them)."""
    eos = _as_list(gc.eos_token_id)
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
    start = [validate.special_id(s, "decoder_start_token_id", vocab_size) for s in _as_list(start)]
    if len(start) == 1:
        start = start * batch
    elif len(start) != batch:
        raise InvalidInputError(f"decoder_start_token_id has {len(start)} entries but the batch has {batch} rows.")
    if pad is None and eos is not None:
        warnings.warn(f"pad_token_id is not set: finished sequences are padded with eos_token_id {eos[0]} "
                      "(as transformers does). Set pad_token_id to silence this.", stacklevel=3)
        pad = eos[0]
        if any(0 <= e < vocab_size for e in eos):  # rows can finish, and are then fed the padding id
            validate.special_id(pad, "pad_token_id (unset, so eos_token_id[0])", vocab_size)
    return eos, pad, start


def _decoder_prefix(model, decoder_input_ids, start: list[int], batch: int) -> torch.Tensor:
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
                      UserWarning, stacklevel=3)
    validate.generation_length(gc.max_length, P, model.cfg.decoder.max_length)


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
@torch.no_grad()  # not inference_mode: the returned tensors must stay ordinary tensors (writable, usable in autograd)
def generate(model, input_ids=None, attention_mask=None, generation_config=None, *, stop_check_every: int | None = None,
             **kwargs):
    """transformers' EncoderDecoderModel.generate on an encdec_fast model; see the module docstring.

    stop_check_every: host checks for finished sequences every this many steps (default 1 on CPU, 16 else)."""
    gc, model_kwargs, has_default_max_length = resolve_config(model, generation_config, kwargs)
    ids = validate.token_ids(input_ids, "input_ids", model.cfg.encoder).to(model.device)
    B = ids.shape[0]
    eos, pad, start = special_tokens(gc, B, model.cfg.decoder.vocab_size)
    prefix = _decoder_prefix(model, model_kwargs.get("decoder_input_ids"), start, B)
    P = prefix.shape[1]
    prepare_lengths(model, gc, has_default_max_length, P)
    num_beams = gc.num_beams or 1
    expand = max(num_beams, gc.num_return_sequences or 1)
    cfg = sel.RowConfig.from_generation_config(gc, prompt_len=P, eos=eos, pad=pad, vocab_size=model.cfg.decoder.vocab_size)
    if stop_check_every is None:
        stop_check_every = 1 if model.device.type == "cpu" else 16
    validate.number(stop_check_every, "stop_check_every", validate.Field("int", 1))

    # the encoder once, on the packed real tokens; cross K/V once per layer, packed: request b's keys are
    # tokens cu_seqlens[b] .. cu_seqlens[b+1] (its beams and returned sequences read the same span)
    net, ops = model.net, model.ops
    enc, packing = model.encode_packed(ids, attention_mask, model_kwargs.get("token_type_ids"))
    cross = net.decoder.cross_kv(net.project(enc, ops), ops)  # per layer (K, V) each (T, H, D)
    N, T, L = B * expand, packing.total, gc.max_length
    state = _decode_state(model, N, T, L)
    state.set_cross(torch.arange(T, device=model.device), cross)
    starts = packing.cu_seqlens[:-1].long().repeat_interleave(expand)  # (N,)
    lens = torch.tensor(packing.lengths, dtype=torch.int32, device=model.device).repeat_interleave(expand)
    prefix = prefix.repeat_interleave(expand, dim=0)  # (N, P)
    state.spec = sel.Spec.of([cfg])
    if num_beams > 1:
        fill = fill_token(num_beams, pad, eos)
        group = state.beam_group(num_beams, len(eos or ()), joint=True)
        state.beam_sampling = B if gc.do_sample else 0
        kw = dict(length_penalty=gc.length_penalty, early_stopping=gc.early_stopping)
        for b in range(B):
            rows = slice(b * num_beams, (b + 1) * num_beams)
            state.join(group.rows[b], prefix[rows], cfg, enc_start=starts[rows], enc_len=lens[rows], limit=L,
                       fill=fill, beam=(group, b, kw | dict(offset=b * num_beams)))
    else:
        state.join(torch.arange(N, device=model.device), prefix, cfg, enc_start=starts, enc_len=lens, limit=L,
                   fill=fill_token(1, pad, eos))
    state.prefill(P)

    want_scores = bool(gc.return_dict_in_generate and gc.output_scores)
    want_logits = bool(gc.return_dict_in_generate and gc.output_logits)
    state.keep_scores = want_scores
    scores, raw = [], []
    steps = L - P
    choose = None
    if gc.do_sample and num_beams == 1:  # one multinomial over the request's rows, as transformers draws
        def choose(scores):
            toks = sel.greedy(scores)
            toks[:N] = sel.sample(scores[:N])
            return toks
    for s in range(steps):
        state.step(choose=choose, filled=P + s)
        if want_scores:
            scores.append(state.scores[:N].float().clone())
        if want_logits:
            raw.append(state.logits[:N].float().clone())
        if ((s + 1) % stop_check_every == 0 or s + 1 == steps) and int(state.all_stopped_at):
            break
    n_run = int(state.all_stopped_at) or steps
    if bool(state.nonfinite[:N].any()):  # NaN/inf logits (float16 overflow...): an error, not junk tokens
        raise validate.nonfinite_error()
    if num_beams > 1:
        return _beam_output(gc, state, B, P, n_run, scores, raw)
    seq = state.seq[:N, :P + n_run].clone()
    if not gc.return_dict_in_generate:
        return seq
    from transformers.generation.utils import GenerateEncoderDecoderOutput

    return GenerateEncoderDecoderOutput(sequences=seq, scores=tuple(scores[:n_run]) if want_scores else None,
                                        logits=tuple(raw[:n_run]) if want_logits else None)


def fill_token(num_beams: int, pad: int | None, eos: list[int] | None) -> int:
    """What transformers' token buffers hold past the prefix: pad for greedy/sampling; for beam search
    `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1` (pad 0 counts as unset)."""
    if num_beams == 1:
        return pad if pad is not None else 0
    return (pad if pad else eos[0]) if eos is not None else -1


def _decode_state(model, rows: int, enc_tokens: int, max_length: int) -> DecodeState:
    """A fresh state, or on CUDA (and for the CPU tests of it, model.static_decode) a bucket-sized one
    from the model's cache, whose captured steps later calls reuse."""
    capture = model.device.type == "cuda" and model.cuda_graphs
    if capture or model.static_decode:
        return model.graph_cache.get(model, rows, enc_tokens, max_length, capture)
    return DecodeState(model, rows, max_length, 1, enc_tokens)


def beam_results(group, slots: list[int], returned: int, P: int, max_length: int):
    """The finished hypotheses of beam slots, as transformers returns them: (sequences (len(slots) *
    returned, P + gen_len), their scores, beam_indices (.., gen_len)), gen_len being the longest of
    the returned hypotheses' generated lengths."""
    idx = torch.tensor(slots, device=group.hyps.device)
    Lc = group.hyps.shape[-1]
    sequences = group.hyps[idx, :returned].reshape(-1, Lc)[:, :max_length]
    scores = group.beam_scores[idx, :returned].reshape(-1)
    beam_indices = group.beam_indices[idx, :returned].reshape(-1, Lc)[:, :max_length - P]
    gen_len = int((beam_indices + 1).bool().sum(dim=1).max())
    return sequences[:, :P + gen_len].clone(), scores.clone(), beam_indices[:, :gen_len].clone()


def _beam_output(gc, state: DecodeState, B: int, P: int, n_run: int, scores, raw):
    """transformers' beam-search return value, from the finished hypotheses of each request."""
    group = state.beam_group(gc.num_beams, len(_as_list(gc.eos_token_id) or ()), joint=True)
    sequences, beam_scores, beam_indices = beam_results(group, list(range(B)), gc.num_return_sequences or 1, P,
                                                        gc.max_length)
    if not gc.return_dict_in_generate:
        return sequences
    from transformers.generation.utils import GenerateBeamEncoderDecoderOutput

    want_scores = bool(gc.output_scores)
    return GenerateBeamEncoderDecoderOutput(
        sequences=sequences, sequences_scores=beam_scores if want_scores else None,
        scores=tuple(scores[:n_run]) if want_scores else None,
        logits=tuple(raw[:n_run]) if gc.output_logits else None, beam_indices=beam_indices)
