"""generate(): greedy, sampling, beam search (and beam sampling), as transformers 5.x does them.

generate() takes transformers' arguments and returns what EncoderDecoderModel.generate returns, token
for token. The work per call:

  1. resolve the settings once (decode/params.py: GenerationConfig, special tokens, prefix, lengths);
  2. run the encoder once, on the packed real tokens, and project each decoder layer's cross-attention
     K/V once: the inputs' beams and returned sequences read their input's span, nothing is copied;
  3. run decode/step.py's step (the one the Engine runs too: decoder, processors, token choice, beam
     bookkeeping, all on the device) through decode/runner.py until every row has stopped.

The host looks at the finished flags only every `stop_check_every` steps (1 on CPU, where a look
costs nothing and an extra step costs a whole step; 16 on GPUs). The state records the step at which
every row had stopped, so a late look still returns what transformers returns: the steps run past it
only append padding, which is cut off, and their scores are dropped.

A call with a streamer, stopping criteria (max_time, stop_strings included) or its own logits processors
runs them on the host (decode/host.py's HostLoop): it looks after every step, and its steps run eagerly
where the host must act inside them. encoder_outputs= skips the encoder: the given states are packed (their
padding positions, per attention_mask, dropped) and decoded as the encoder's own would be.
"""

from __future__ import annotations

import torch

from .. import validate
from ..errors import InvalidInputError
from ..packing import Packing
from . import select as sel
from .host import HostLoop
from .params import GenParams, resolve
from .runner import StepRunner
from .state import DecodeState
from .step import StepPlan


@torch.no_grad()  # not inference_mode: the returned tensors must stay ordinary tensors (writable, usable in autograd)
def generate(model, input_ids=None, attention_mask=None, generation_config=None, *, stop_check_every: int | None = None,
             **kwargs):
    """transformers' EncoderDecoderModel.generate on an encdec_fast model; see the module docstring.

    stop_check_every: host checks for finished sequences every this many steps (default 1 on CPU, 16 else).
    encoder_outputs (a keyword): the encoder's output for the batch, (B, S, hidden) as a tensor, a tuple
    holding it first or a ModelOutput (transformers' `encoder_outputs=model.get_encoder()(...)`); the
    encoder is skipped, attention_mask marks the states' real positions, input_ids may be left out."""
    enc = kwargs.pop("encoder_outputs", None)
    ids = None
    if enc is not None:
        enc = validate.encoder_outputs(enc, model.cfg.encoder.hidden_size)
    if enc is None or input_ids is not None:
        ids = validate.token_ids(input_ids, "input_ids", model.cfg.encoder).to(model.device)
    if enc is not None and ids is not None and ids.shape[0] != enc.shape[0]:
        raise InvalidInputError(f"input_ids has batch {ids.shape[0]} but encoder_outputs {enc.shape[0]}; they must match "
                                "(or leave input_ids out: the encoder does not run).")
    params = resolve(model, generation_config, kwargs, batch=enc.shape[0] if enc is not None else ids.shape[0])
    if stop_check_every is None:
        stop_check_every = 1 if model.device.type == "cpu" else 16
    validate.number(stop_check_every, "stop_check_every", validate.Field("int", 1))
    return run(model, ids, attention_mask, params, stop_check_every=stop_check_every, encoder_states=enc)


@torch.no_grad()
def run(model, ids: torch.Tensor | None, attention_mask, params: GenParams, *, stop_check_every: int = 1,
        encoder_states: torch.Tensor | None = None):
    """generate() with its settings resolved: ids (B, S) validated, on the model's device, or
    encoder_states (B, S, hidden) validated, whose encoder output they are."""
    runner, group, B = _start(model, ids, attention_mask, params, encoder_states)
    P = params.prompt_len
    N = B * params.rows_per_input
    host = HostLoop(params.host, runner.state, B, N, P, beams=group is not None) if params.host else None
    plan = StepPlan(spec=sel.Spec.of([params.select]), plain=group is None, beams=(group.key,) if group else (),
                    sample=params.do_sample and params.num_beams == 1,
                    beam_sample=params.do_sample and params.num_beams > 1, keep_scores=params.output_scores,
                    host=host is not None and host.inside)
    choose, draws = None, ()
    if plan.sample:  # one multinomial over the request's rows, as transformers draws
        def choose(scores):
            toks = sel.greedy(scores)
            toks[:N] = sel.sample(scores[:N])
            return toks
    if plan.beam_sample:  # one multinomial over every input's beams, as transformers draws
        draws = [(group, slice(0, B), None)]
    scores, raw = [], []
    steps = params.max_length - P
    kept = (lambda: tuple(scores)) if params.output_scores else (lambda: None)  # what criteria see as `scores`
    try:
        for s in range(steps):
            out = runner.step(plan, choose=choose, draws=draws, hooks=host.hooks(s, kept()) if host else None)
            if params.output_scores:
                scores.append(out.scores[:N].float().clone())
            if params.output_logits:
                raw.append(out.logits[:N].float().clone())
            if host is not None:
                host.after(s, kept())
            look = host is not None or (s + 1) % stop_check_every == 0 or s + 1 == steps
            if look and int(runner.state.all_stopped_at):
                break
    finally:
        if host is not None:
            host.end()
    n_run = int(runner.state.all_stopped_at) or steps
    if bool(runner.state.nonfinite[:N].any()):  # NaN/inf logits (float16 overflow...): an error, not junk tokens
        raise validate.nonfinite_error()
    if params.num_beams > 1:
        return _beam_output(params, runner.state, B, n_run, scores, raw)
    seq = runner.state.seq[:N, :P + n_run].clone()
    if not params.gc.return_dict_in_generate:
        return seq
    from transformers.generation.utils import GenerateEncoderDecoderOutput

    return GenerateEncoderDecoderOutput(sequences=seq, scores=tuple(scores[:n_run]) if params.output_scores else None,
                                        logits=tuple(raw[:n_run]) if params.output_logits else None)


def _start(model, ids, attention_mask, params: GenParams, encoder_states=None):
    """The encoder once (unless its states are given), the cross K/V once per layer (packed: input b's keys
    are tokens cu_seqlens[b] .. cu_seqlens[b+1]), and a runner whose state holds every input's rows, prefix
    fed. -> (runner, the beam group of a beam search or None, the number of inputs)."""
    net, ops = model.net, model.ops
    if encoder_states is None:
        enc, packing = model.encode_packed(ids, attention_mask, params.token_type_ids)
    else:
        enc, packing = _packed_states(model, encoder_states, attention_mask)
    cross = net.decoder.cross_kv(net.project(enc, ops), ops)  # per layer (K, V) each (T, H, D)
    B, expand, T, L = packing.batch, params.rows_per_input, packing.total, params.max_length
    runner = _runner(model, B * expand, T, L)
    state = runner.state
    state.set_cross(torch.arange(T, device=model.device), cross)
    starts = packing.cu_seqlens[:-1].long().repeat_interleave(expand)  # (N,)
    lens = torch.tensor(packing.lengths, dtype=torch.int32, device=model.device).repeat_interleave(expand)
    prefix = params.prefix.repeat_interleave(expand, dim=0)  # (N, P)
    group = None
    if params.num_beams > 1:
        nb = params.num_beams
        group = state.beam_group(nb, len(params.eos or ()), joint=True)
        kw = dict(length_penalty=params.gc.length_penalty, early_stopping=params.gc.early_stopping)
        for b in range(B):
            rows = slice(b * nb, (b + 1) * nb)
            state.join(list(range(b * nb, (b + 1) * nb)), prefix[rows], params.select, enc_start=starts[rows],
                       enc_len=lens[rows], limit=L, fill=params.fill, beam=(group, b, kw | dict(offset=b * nb)))
    else:
        state.join(list(range(B * expand)), prefix, params.select, enc_start=starts, enc_len=lens, limit=L,
                   fill=params.fill)
    state.prefill(params.prompt_len)
    return runner, group, B


def _packed_states(model, states: torch.Tensor, attention_mask):
    """Given encoder states (B, S, hidden) -> (their real positions packed (T, hidden), Packing), as
    model.encode_packed returns the encoder's own."""
    states = states.to(device=model.device, dtype=model.dtype)
    mask = validate.attention_mask(attention_mask, states.shape[:2], "attention_mask")
    packing = Packing.from_mask(mask.to(model.device) if mask is not None else None, states.shape[0], states.shape[1],
                                model.device)
    return packing.pack(states), packing


def _runner(model, rows: int, enc_tokens: int, max_length: int) -> StepRunner:
    """A fresh state, or on CUDA (and for the CPU tests of that path, model.graph_shapes) a bucket-sized
    one from the model's cache, whose captured steps later calls reuse."""
    capture = model.device.type == "cuda" and model.cuda_graphs
    if capture or model.graph_shapes:
        return model.state_cache.get(model, rows, enc_tokens, max_length, capture)
    return StepRunner(DecodeState(model, rows, max_length, 1, enc_tokens))


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


def _beam_output(params: GenParams, state: DecodeState, B: int, n_run: int, scores, raw):
    """transformers' beam-search return value, from the finished hypotheses of each input."""
    gc = params.gc
    group = state.beam_group(params.num_beams, len(params.eos or ()), joint=True)  # _start's
    sequences, beam_scores, beam_indices = beam_results(group, list(range(B)), params.num_return_sequences,
                                                        params.prompt_len, params.max_length)
    if not gc.return_dict_in_generate:
        return sequences
    from transformers.generation.utils import GenerateBeamEncoderDecoderOutput

    want_scores = bool(gc.output_scores)
    return GenerateBeamEncoderDecoderOutput(
        sequences=sequences, sequences_scores=beam_scores if want_scores else None,
        scores=tuple(scores[:n_run]) if want_scores else None,
        logits=tuple(raw[:n_run]) if gc.output_logits else None, beam_indices=beam_indices)
