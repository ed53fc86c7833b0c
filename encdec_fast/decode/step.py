"""One decode step over a DecodeState, as a function of the state and a frozen StepPlan.

    out = forward(state, plan)                     # the decoder, the NaN/inf look, the processors
    commit(state, plan, out, tokens, draws=...)    # token choice and the step's bookkeeping

forward: the decoder over every row (all layers + LM head: modules.Decoder.step) -> one look at the
logits (decode/ops.py's scan_logits: NaN/inf rows flagged, and a plain greedy step's argmax in the same
pass) -> the logits processors (decode/select.py), materialised only when something reads the processed
scores (a sampling choice, beam sampling, a caller keeping them): greedy and beam choice otherwise run
the processors inside their selection ops (select_greedy / select_beam, fused in the csrc kernels).

commit: the rows outside beam groups take `tokens` (None: greedy); each beam group chooses its beams
(decode/beam.py) and their caches follow their parents; then decode/ops.py's commit_tokens writes the
tokens, detects eos, advances the rows and marks where they stopped.

The plan is what the caller decided from its requests (processor spec, beam layout, sampling, kept
scores); nothing here reads the host's copy of the state, so a CUDA graph of forward (and of commit, when
nothing is drawn on the host) replays the same work. decode/runner.py decides how a step runs.

A plan with `host` carries StepHooks: functions of the caller's that run inside the step on the host
(the caller's own logits processors, stopping criteria on beam candidates: decode/host.py). Such a step
is never captured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import select as sel


@dataclass(frozen=True)
class StepPlan:
    """What one step does; hashable, the key of its captured graph.

    spec: the logits processors (the union over the rows' settings). plain: some busy rows are outside beam
    groups (greedy or sampled). beams: the keys of the beam groups with requests. sample: the plain rows'
    tokens are drawn by the caller between forward and commit. beam_sample: beam groups draw their
    candidates for the slots the caller names (beam sampling). keep_scores: the caller reads the processed
    scores after the step (output_scores). host: the caller passes StepHooks (the step runs eagerly, and
    the hooks' processors see the processed scores)."""

    spec: sel.Spec = sel.Spec()
    plain: bool = True
    beams: tuple[tuple[int, int], ...] = ()
    sample: bool = False
    beam_sample: bool = False
    keep_scores: bool = False
    host: bool = False

    @property
    def processed(self) -> bool:
        """forward materialises the processed scores: something besides the selection ops reads them."""
        return self.sample or self.beam_sample or self.keep_scores or self.host

    @property
    def host_free(self) -> bool:
        """Nothing is drawn on the host: forward and commit run back to back (one graph on CUDA)."""
        return not (self.sample or self.beam_sample or self.host)


@dataclass(frozen=True)
class StepHooks:
    """The caller's host functions inside a step (a plan with `host`; eager steps only).

    scores(scores (n, V) fp32) -> scores: runs on the processed scores between the built-in processors and
    the sampling warpers (temperature, top-k, top-p), where transformers runs the processors a caller
    passes; the greedy choice, the draws and beam ranking then read its result. beam_hits(candidate tokens
    (R, K, Lc), the step's scores) -> (R, K) bool: candidates that stop besides eos and
    max_length (transformers' stopping criteria, applied to each beam candidate)."""

    scores: Callable | None = None
    beam_hits: Callable | None = None


@dataclass
class StepOutput:
    """forward's results: the raw logits, the scores commit and the caller read (processed, or the raw
    logits when nothing is processed), and the argmax forward's look took (greedy steps without
    processors), else None."""

    logits: torch.Tensor
    scores: torch.Tensor
    greedy: torch.Tensor | None


def forward(state, plan: StepPlan, extent: tuple[int, int] | None = None, hooks: StepHooks | None = None) -> StepOutput:
    """The decoder over the rows and the processors (see the module docstring). extent: (rows, token
    slots) that hold anything, so that an idle tail costs nothing (rows past it score nothing; commit
    treats them as idle); None: every row over the whole buffers, as a captured step runs. Cross-attention
    reads each row's own span of the arena either way. hooks: a host plan's StepHooks."""
    dops = state.dops
    n, L = extent if extent is not None else (state.rows, state.seq_cap)
    t = state.t[:n]  # row r feeds its last token seq[r, t[r] - 1], into cache slot t[r] - 1
    ks, vs = state.cache.layers
    cache = ([k[:n, :L] for k in ks], [v[:n, :L] for v in vs]) if extent is not None else (ks, vs)
    logits = state.decoder.step(state.seq[:n], t, cache, state.cross, state.cross_start[:n], state.enc_lens[:n],
                                state.enc_bound, state.ops)
    # one pass over the logits: running rows with NaN/inf are flagged (the sampled draws are kept safe), and a
    # greedy step without processors takes its argmax in the same pass (commit uses it)
    fused_greedy = not plan.processed and not plan.spec.needs_scores and plan.plain
    greedy = dops.scan_logits(logits, state.busy[:n], state.stop_t[:n], state.nonfinite[:n], argmax=fused_greedy)
    on_host = hooks is not None and hooks.scores is not None
    if not (plan.processed and (plan.spec.needs_scores or plan.beams or on_host)):
        return StepOutput(logits, logits, greedy)
    scores = logits.float()
    if plan.beams:
        scores = torch.where(state.is_beam[:n, None], torch.log_softmax(scores, dim=-1), scores)
    seq, tab = state.seq[:n], state.tables
    if not on_host:
        return StepOutput(logits, sel.process(scores, seq, t, tab, plan.spec), greedy)
    built_in, warpers = plan.spec.split()
    scores = hooks.scores(sel.process(scores, seq, t, tab, built_in))
    return StepOutput(logits, sel.process(scores, seq, t, tab, warpers), greedy)


def commit(state, plan: StepPlan, out: StepOutput, tokens: torch.Tensor | None = None, *, draws=(),
           move_length: int | None = None, move_caches: bool = True, hooks: StepHooks | None = None):
    """Token choice and bookkeeping (see the module docstring). tokens: the plain rows' tokens (None:
    greedy). draws: beam sampling's [(beam group, its slots, torch.Generator or None)], one multinomial each
    (decode/beam.py). move_length: the cache prefix
    beam rows move (None: all of it); move_caches=False leaves caches alone (a warm-up before capture).
    hooks: a host plan's StepHooks (greedy and beam ranking then read out.scores, which their processors made)."""
    dops = state.dops
    tab, logits, scores = state.tables, out.logits, out.scores
    n, N = logits.shape[0], state.rows
    on_host = hooks is not None and hooks.scores is not None
    if tokens is None:  # greedy for the rows outside beams (none: pad, which nothing reads)
        if out.greedy is not None:  # taken by forward's pass over the logits (no processors)
            tokens = out.greedy
        elif plan.plain and on_host:  # the host's processors ran: argmax of what they returned
            tokens = sel.greedy(scores)
        elif plan.plain:
            tokens = dops.select_greedy(logits, state.seq[:n], state.t[:n], tab, plan.spec)
        else:
            tokens = tab.pad[:n]
    if n < N:  # an eager extent: the rows past it are idle
        tokens = torch.cat([tokens, tab.pad[n:]])
        if plan.beams:  # beam groups read every row
            logits = torch.cat([logits, logits.new_zeros(N - n, logits.shape[1])])
            if plan.beam_sample or on_host:
                scores = torch.cat([scores, scores.new_zeros(N - n, scores.shape[1])])
    beam_done = state.no_beam_done
    if plan.beams or tab.seen is not None:
        room = state.busy & (state.t < state.limit)  # rows that take a token this step
        if tab.seen is not None:  # the repetition penalty's token sets follow the plain rows' choices
            tab.observe(torch.where(state.alive, tokens, tab.pad), room & ~state.is_beam)
    if plan.beams:  # beam rows: their groups choose, write their tokens and move their caches
        at = state.t.clamp(max=state.seq_cap - 1)[:, None]
        beam_done = torch.zeros_like(state.busy)
        for key in plan.beams:
            g = state.groups[key]
            parents = g.step(logits, state.seq, state.t, tab, plan.spec, dops, scores=scores,
                             draws=[(slots, gen) for group, slots, gen in draws if group is g], ranked=on_host,
                             extra_hits=hooks.beam_hits if hooks is not None else None)
            rows = g.rows.reshape(-1)
            if move_caches:
                state.cache.move(rows, parents[rows], move_length)
            tab.reorder(rows, parents[rows])
            tab.observe(state.seq.gather(1, at).squeeze(1), state.is_beam & room)
            beam_done[rows] = (g.done & g.active)[:, None].expand_as(g.rows).reshape(-1)  # a beam row stops with its request
    # the rest (pad for finished rows, eos, token writes, progress, stop marks, step counts): one op
    dops.commit_tokens(tokens, state.seq, state.t, state.limit, state.alive, state.busy, state.is_beam, beam_done,
                       state.stop_t, tab.pad, tab.eos, state.steps, state.all_stopped_at)
