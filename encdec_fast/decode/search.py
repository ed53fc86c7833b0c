"""The decode loop: greedy, sampling, beam search (and beam sampling), as transformers 5.x does them.

generate() takes transformers' arguments and returns what EncoderDecoderModel.generate returns, token
for token. The work per request:

  1. resolve the GenerationConfig exactly as GenerationMixin.generate does (argument config, then
     model.generation_config, then the global defaults, then kwargs; special tokens; lengths);
  2. run the encoder once, project each decoder layer's cross-attention K/V once (encoder rows only:
     beams and num_return_sequences point at their encoder row through kv_index, nothing is copied);
  3. decode one token per row per step over a preallocated self-attention cache (state.KVCache),
     with the logits processors of select.py; beam search gathers the filled cache prefix.

The loop is static: fixed buffers, a device tensor `pos`, in-place writes, and no host sync per step
except the finished-check, done every `stop_check_every` steps (1 on CPU, where a check costs nothing
and an extra step costs a whole step; 8 on GPUs). A done-flag is recorded on the device at every step,
so a late check still stops where transformers stops: the steps run past it are cut off (they do not
change the returned sequences; their scores are dropped).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError, UnsupportedArgumentError
from . import select as procs_mod
from .state import KVCache

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


def resolve_config(model, generation_config=None, kwargs=None):
    """-> (GenerationConfig, model kwargs, has_default_max_length), as GenerationMixin resolves them."""
    from transformers import GenerationConfig

    kwargs = dict(kwargs or {})
    _refuse([k for k in _CALL_ARGS if kwargs.get(k) not in (None, False)], "a transformers generate() argument")
    for k in _CALL_ARGS:
        kwargs.pop(k, None)
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise UnsupportedArgumentError(f"generation_config must be a transformers GenerationConfig, got "
                                       f"{type(generation_config).__name__}; pass options as keyword arguments instead.")
    base = model.generation_config if model.generation_config is not None else GenerationConfig()
    has_default_max_length = (kwargs.get("max_length") is None
                              and (generation_config is None or generation_config.max_length is None)
                              and base.max_length is None)
    try:
        gc = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
        gc.update(**base.to_dict(), defaults_only=True, allow_custom_entries=True)
        gc.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
        model_kwargs = gc.update(**kwargs)
    except ValueError as e:
        raise InvalidInputError(f"invalid generation argument: {e}") from None
    _refuse([k for k in model_kwargs if k not in _MODEL_KWARGS and model_kwargs[k] is not None], "unknown or model argument")
    _refuse([k for k, off in _OFF_VALUES.items() if getattr(gc, k, None) not in off], "generation option")
    return gc, model_kwargs, has_default_max_length


def _ids(x, name: str) -> list[int] | None:
    """int, list of ints or tensor -> list of ints (None stays None)."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    x = [x] if isinstance(x, int) else list(x)
    if not x or any(not isinstance(i, int) for i in x):
        raise InvalidInputError(f"{name} must be an int or a non-empty list of ints, got {x!r}.")
    return x


def special_tokens(gc, batch: int):
    """-> (eos list or None, pad int or None, decoder start (B, 1) list-able), as _prepare_special_tokens."""
    eos = _ids(gc.eos_token_id, "eos_token_id")
    pad = gc.pad_token_id
    if isinstance(pad, torch.Tensor):
        pad = int(pad)
    start = gc.decoder_start_token_id if gc.decoder_start_token_id is not None else gc.bos_token_id
    if start is None:
        raise InvalidInputError(
            "no decoder_start_token_id: neither generation_config.decoder_start_token_id nor bos_token_id is set. "
            "Pass decoder_start_token_id=... to generate(), or set model.generation_config.decoder_start_token_id.")
    start = _ids(start, "decoder_start_token_id")
    if len(start) == 1:
        start = start * batch
    elif len(start) != batch:
        raise InvalidInputError(f"decoder_start_token_id has {len(start)} entries but the batch has {batch} rows.")
    if pad is None and eos is not None:
        warnings.warn(f"pad_token_id is not set: finished sequences are padded with eos_token_id {eos[0]} "
                      "(as transformers does). Set pad_token_id to silence this.", stacklevel=3)
        pad = eos[0]
    return eos, pad, start


def _decoder_prefix(model, decoder_input_ids, start: list[int], batch: int) -> torch.Tensor:
    """(B, P): decoder_start, or the given prefix with decoder_start prepended when no row starts with it."""
    start_t = torch.tensor(start, dtype=torch.long, device=model.device).view(-1, 1)
    if decoder_input_ids is None:
        return start_t
    dec = model.check_ids(decoder_input_ids, "decoder_input_ids", model.cfg.decoder)
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
    if P >= gc.max_length:
        raise InvalidInputError(f"decoder_input_ids has length {P} (decoder start included) but max_length is "
                                f"{gc.max_length}; increase max_length or, better, set max_new_tokens.")
    positions = model.cfg.decoder.max_length
    if gc.max_length - 1 > positions:  # the last token is never fed back
        raise InvalidInputError(
            f"max_length {gc.max_length} (prefix {P} + new tokens) needs {gc.max_length - 1} decoder positions but the "
            f"decoder has {positions}; lower max_new_tokens to at most {positions + 1 - P}.")


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
@torch.no_grad()  # not inference_mode: the returned tensors must stay ordinary tensors (writable, usable in autograd)
def generate(model, input_ids=None, attention_mask=None, generation_config=None, *, stop_check_every: int | None = None,
             **kwargs):
    """transformers' EncoderDecoderModel.generate on an encdec_fast model; see the module docstring.

    stop_check_every: host checks for finished sequences every this many steps (default 1 on CPU, 8 else)."""
    gc, model_kwargs, has_default_max_length = resolve_config(model, generation_config, kwargs)
    ids = model.check_ids(input_ids, "input_ids", model.cfg.encoder)
    B = ids.shape[0]
    eos, pad, start = special_tokens(gc, B)
    prefix = _decoder_prefix(model, model_kwargs.get("decoder_input_ids"), start, B)
    P = prefix.shape[1]
    prepare_lengths(model, gc, has_default_max_length, P)
    num_beams = gc.num_beams or 1
    expand = max(num_beams, gc.num_return_sequences or 1)
    V = model.cfg.decoder.vocab_size
    pipeline = procs_mod.build(gc, prompt_len=P, eos=eos, vocab_size=V, device=model.device)
    if stop_check_every is None:
        stop_check_every = 1 if model.device.type == "cpu" else 8
    if not isinstance(stop_check_every, int) or stop_check_every < 1:
        raise UnsupportedArgumentError(f"stop_check_every must be a positive int, got {stop_check_every!r}.")

    # encoder once; cross K/V once per layer, per encoder row
    g, ops = model.net, model.ops
    enc, enc_mask = model.encode(ids, attention_mask, model_kwargs.get("token_type_ids"))
    cross = g.decoder.cross_kv(g.project(enc, ops), ops)
    N = B * expand
    kv_index = None if expand == 1 else torch.arange(B, device=model.device).repeat_interleave(expand)
    enc_lens = torch.full((N,), enc.shape[1], dtype=torch.int32, device=model.device)
    keep = bool(gc.return_dict_in_generate and (gc.output_scores or gc.output_logits))
    ctx = _Decode(model, cross, enc_mask, kv_index, enc_lens, N, gc.max_length, keep)
    prefix = prefix.repeat_interleave(expand, dim=0)  # (N, P)
    eos_t = torch.tensor(eos, dtype=torch.long, device=model.device) if eos is not None else None
    if num_beams > 1:
        return _beam_search(ctx, prefix, gc, pipeline, eos_t, pad, B, stop_check_every)
    return _sample(ctx, prefix, gc, pipeline, eos_t, pad, stop_check_every)


class _Decode:
    """Everything a decode step needs, fixed for the request: one call per token per row."""

    def __init__(self, model, cross, enc_mask, kv_index, enc_lens, rows: int, max_length: int, keep_logits: bool):
        self.decoder, self.ops = model.net.decoder, model.ops
        self.cross, self.enc_mask, self.kv_index, self.enc_lens = cross, enc_mask, kv_index, enc_lens
        self.device = model.device
        self.keep_logits = keep_logits  # the caller stores logits across steps: no static buffer then
        self.graphed = None
        capture = model.device.type == "cuda" and model.cuda_graphs
        if capture or model.static_decode:
            # one captured graph per shape bucket, reused across requests (state.py)
            self.graphed = model.graph_cache.get(model, cross, enc_mask, kv_index, enc_lens, rows, max_length - 1,
                                                 capture)
            self.cache, self.pos = self.graphed.cache, self.graphed.pos
        else:
            self.cache = KVCache(model.cfg.decoder, rows, max_length - 1, dtype=model.dtype, device=model.device)
            self.pos = torch.zeros(1, dtype=torch.long, device=model.device)  # tokens already in the cache

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N,) at slot pos -> fp32 logits (N, V); advances pos."""
        if self.graphed is not None:
            logits = self.graphed(tokens)  # with a graph: a static buffer, overwritten by the next step
            self.pos += 1
            return logits.clone() if self.keep_logits else logits
        logits = self.decoder.step(tokens, self.pos, self.cache.layers, self.cross, self.enc_mask, self.kv_index,
                                   self.enc_lens, self.ops)
        self.pos += 1
        return logits.float()  # a fresh tensor every step; nothing downstream writes into it

    def reorder(self, row_idx: torch.Tensor, length: int):
        """Beam search: row n continues row row_idx[n] (its cache prefix [:length] follows)."""
        (self.graphed if self.graphed is not None else self.cache).reorder(row_idx, length)

    def prefill(self, prefix: torch.Tensor):
        """Feeds all but the last prefix token (their logits are not needed)."""
        for j in range(prefix.shape[1] - 1):
            self(prefix[:, j])


def _first_done(done: torch.Tensor, upto: int) -> int | None:
    """Index of the first True in done[:upto] (one host sync), or None."""
    hit = torch.nonzero(done[:upto])
    return int(hit[0, 0]) if hit.numel() else None


# ------------------------------------------------------------------------------------------------
# greedy and multinomial sampling (transformers' _sample)
# ------------------------------------------------------------------------------------------------
def _sample(ctx: _Decode, prefix, gc, pipeline, eos_t, pad, check_every: int):
    N, P = prefix.shape
    L = gc.max_length
    dev = prefix.device
    want_scores = bool(gc.return_dict_in_generate and gc.output_scores)
    want_logits = bool(gc.return_dict_in_generate and gc.output_logits)
    seq = torch.full((N, L), pad if pad is not None else 0, dtype=torch.long, device=dev)
    seq[:, :P] = prefix
    ctx.prefill(prefix)
    steps = L - P
    unfinished = torch.ones(N, dtype=torch.bool, device=dev)
    done = torch.zeros(steps, dtype=torch.bool, device=dev)
    scores, raw = [], []
    n_run = steps
    for s in range(steps):
        t = P + s
        logits = ctx(seq[:, t - 1])
        next_scores = pipeline(seq[:, :t], logits)
        if want_scores:
            scores.append(next_scores)
        if want_logits:
            raw.append(logits)
        if gc.do_sample:
            tok = torch.multinomial(F.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tok = torch.argmax(next_scores, dim=-1)
        if eos_t is not None:
            tok = torch.where(unfinished, tok, pad)
            unfinished &= ~torch.isin(tok, eos_t)
            torch.logical_not(unfinished.any(), out=done[s])
        seq[:, t] = tok
        if eos_t is not None and ((s + 1) % check_every == 0 or s + 1 == steps):
            first = _first_done(done, s + 1)
            if first is not None:
                n_run = first + 1
                break
    seq = seq[:, :P + n_run]
    if not gc.return_dict_in_generate:
        return seq
    from transformers.generation.utils import GenerateEncoderDecoderOutput

    return GenerateEncoderDecoderOutput(sequences=seq, scores=tuple(scores[:n_run]) if want_scores else None,
                                        logits=tuple(raw[:n_run]) if want_logits else None)


# ------------------------------------------------------------------------------------------------
# beam search (transformers' _beam_search and its helpers, vectorised the same way)
# ------------------------------------------------------------------------------------------------
def _gather_beams(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B, K, ...), idx (B, K') -> (B, K', ...)"""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


def _beam_search(ctx: _Decode, prefix, gc, pipeline, eos_t, pad, B: int, check_every: int):
    N, P = prefix.shape
    nb = gc.num_beams
    L = gc.max_length
    dev = prefix.device
    do_sample, early_stopping, length_penalty = gc.do_sample, gc.early_stopping, gc.length_penalty
    R = gc.num_return_sequences or 1
    want_scores = bool(gc.return_dict_in_generate and gc.output_scores)
    want_logits = bool(gc.return_dict_in_generate and gc.output_logits)
    n_eos = eos_t.shape[0] if eos_t is not None else 0
    K = max(2, 1 + n_eos) * nb  # candidates kept per step
    top_nb_mask = torch.arange(K, device=dev) < nb

    # transformers: `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1` (pad 0 counts as unset)
    fill = (pad if pad else int(eos_t[0])) if eos_t is not None else -1
    running_seq = torch.full((B, nb, L), fill, dtype=torch.long, device=dev)
    running_seq[:, :, :P] = prefix.view(B, nb, P)
    sequences = running_seq.clone()
    running_scores = torch.zeros(B, nb, dtype=torch.float32, device=dev)
    running_scores[:, 1:] = -1e9
    beam_scores = torch.full((B, nb), -1e9, dtype=torch.float32, device=dev)
    finished = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    heuristic_open = torch.ones(B, 1, dtype=torch.bool, device=dev)
    running_bidx = torch.full((B, nb, L - P), -1, dtype=torch.int32, device=dev)
    beam_indices = running_bidx.clone()
    batch_offset = torch.arange(B, device=dev).view(-1, 1) * nb

    ctx.prefill(prefix)
    steps = L - P
    done = torch.zeros(steps, dtype=torch.bool, device=dev)
    scores, raw = [], []
    for s in range(steps):
        cur = P + s
        flat = running_seq.view(N, L)
        logits = ctx(flat[:, cur - 1])
        log_probs = pipeline(flat[:, :cur], F.log_softmax(logits, dim=-1))
        if want_logits:
            raw.append(logits)
        if want_scores:
            scores.append(log_probs)
        V = log_probs.shape[-1]
        acc = (log_probs.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)

        # top-K continuations over all beams of an item
        if do_sample:
            top_idx = torch.multinomial(F.softmax(acc, dim=-1), num_samples=K)
            top_lp = torch.gather(acc, 1, top_idx)
            top_lp, order = top_lp.sort(dim=-1, descending=True)
            top_idx = top_idx.gather(-1, order)
        else:
            top_lp, top_idx = torch.topk(acc, k=K)
        src_beam = top_idx // V
        top_bidx = _gather_beams(running_bidx, src_beam)
        top_seq = _gather_beams(running_seq, src_beam)
        top_seq[:, :, cur] = top_idx % V
        top_bidx[:, :, s] = (src_beam + batch_offset).to(torch.int32)

        # which candidates stop: eos, or max_length reached
        hits = torch.isin(top_seq[:, :, cur], eos_t) if eos_t is not None else torch.zeros_like(top_lp, dtype=torch.bool)
        if cur + 1 >= L:
            hits = torch.ones_like(hits)

        # running beams for the next step: best nb that did not stop
        top_running_lp = top_lp + hits.to(torch.float32) * -1.0e9
        keep = torch.topk(top_running_lp, k=nb)[1]
        running_seq = _gather_beams(top_seq, keep)
        running_scores = _gather_beams(top_running_lp, keep)
        running_bidx = _gather_beams(top_bidx, keep)

        # finished hypotheses: merge the candidates that stopped among the top nb
        just_finished = hits & top_nb_mask[None, :]
        cand = top_lp / ((cur + 1 - P) ** length_penalty)
        full = torch.all(finished, dim=-1, keepdim=True) & (early_stopping is True)
        cand = cand + full.to(torch.float32) * -1.0e9
        cand = cand + (~heuristic_open).to(torch.float32) * -1.0e9
        cand = cand + (~just_finished) * -1.0e9
        merged_idx = torch.topk(torch.cat((beam_scores, cand), dim=1), k=nb)[1]
        sequences = _gather_beams(torch.cat((sequences, top_seq), dim=1), merged_idx)
        beam_scores = _gather_beams(torch.cat((beam_scores, cand), dim=1), merged_idx)
        beam_indices = _gather_beams(torch.cat((beam_indices, top_bidx), dim=1), merged_idx)
        finished = _gather_beams(torch.cat((finished, just_finished), dim=1), merged_idx)

        if s + 1 == steps:
            done[s] = True
            break
        # the cache follows its beams (filled prefix only)
        ctx.reorder(running_bidx[:, :, s].reshape(N).long(), cur)

        # can the running beams still beat the finished ones? (transformers' early-stop heuristic)
        nxt = cur + 1
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = L - P
        else:
            best_len = nxt - P
        best_running = running_scores[:, :1] / (best_len ** length_penalty)
        worst_finished = torch.where(finished, torch.min(beam_scores, dim=1, keepdim=True)[0], -1.0e9)
        heuristic_open = heuristic_open & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        open_beam = ~(torch.all(finished) & (early_stopping is True))
        go_on = torch.any(heuristic_open) & open_beam & ~torch.all(hits)
        torch.logical_not(go_on, out=done[s])
        if (s + 1) % check_every == 0 and _first_done(done, s + 1) is not None:
            break
    n_run = _first_done(done, steps)
    n_run = steps if n_run is None else n_run + 1

    sequences = sequences[:, :R].reshape(B * R, L)
    beam_scores = beam_scores[:, :R].reshape(B * R)
    beam_indices = beam_indices[:, :R].reshape(B * R, L - P)
    gen_len = int((beam_indices + 1).bool().sum(dim=1).max())
    sequences = sequences[:, :P + gen_len]
    beam_indices = beam_indices[:, :gen_len]
    if not gc.return_dict_in_generate:
        return sequences
    from transformers.generation.utils import GenerateBeamEncoderDecoderOutput

    return GenerateBeamEncoderDecoderOutput(
        sequences=sequences, sequences_scores=beam_scores if gc.output_scores else None,
        scores=tuple(scores[:n_run]) if want_scores else None, logits=tuple(raw[:n_run]) if want_logits else None,
        beam_indices=beam_indices)
