"""Beam search's choice, on the device: transformers' vectorised _beam_search step (5.x), for requests
whose beams are rows of one decode state.

Each request slot r holds num_beams decode rows (`rows[r]`). Per step, from the processed log-probs
of those rows (decode/select.py, applied to log_softmax(logits) as transformers does):

  top-K continuations over all beams (K = (1 + number of eos ids) * num_beams; the op table's
  select_beam (decode/ops.py), which the csrc kernel may replace, or multinomial without replacement for beam
  sampling) -> which stop (eos, or max_length reached) -> the best
  num_beams that did not stop become the running beams (their tokens and cache rows follow their
  parents) -> the ones that stopped among the top num_beams merge into the finished hypotheses, with
  the length penalty -> transformers' early-stop heuristic.

Everything transformers computes from Python scalars (the current length, the prompt length, the
length penalty, early_stopping, max_length) is a per-request tensor here, so one step serves requests
at different lengths and settings and can be captured as a CUDA graph. The same op order as
transformers keeps the scores bit-identical in fp32 (the tests compare sequences and scores).

Stopping: transformers stops a batch when no request can improve (`joint=True`, generate()); the
Engine stops each request on its own condition (`joint=False`), which is the same condition for a
batch of one.
"""

from __future__ import annotations

import torch

from .select import is_eos, sampling_probs

_BIG = -1.0e9


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (R, K, ...), idx (R, K') -> (R, K', ...)"""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


class BeamGroup:
    """Beam bookkeeping for requests of `num_beams` beams each (the same K) in a decode state of
    `rows` rows: slot r owns the decode rows r*num_beams ... (r+1)*num_beams - 1, a fixed layout, so
    that the slots' writes never overlap (an idle slot rewrites its rows unchanged)."""

    def __init__(self, rows: int, num_beams: int, n_eos: int, seq_cap: int, device, *, joint: bool):
        R, nb, L = rows // num_beams, num_beams, seq_cap
        self.R, self.nb, self.K, self.joint = R, num_beams, max(2, 1 + n_eos) * num_beams, joint
        self.key = (nb, self.K)  # its key in DecodeState.groups and StepPlan.beams
        i64 = dict(dtype=torch.long, device=device)
        self.rows = torch.arange(R * nb, device=device).view(R, nb)  # decode rows of each slot's beams
        self.active = torch.zeros(R, dtype=torch.bool, device=device)
        self.prompt = torch.ones(R, **i64)  # P: decoder prefix length
        self.max_length = torch.full((R,), 2, **i64)
        self.length_penalty = torch.ones(R, dtype=torch.float64, device=device)
        self.early_true = torch.zeros(R, dtype=torch.bool, device=device)  # early_stopping is True
        self.never_lp = torch.zeros(R, dtype=torch.bool, device=device)  # "never" with length_penalty > 0
        self.offset = torch.zeros(R, 1, **i64)  # beam_indices base (b * num_beams in a generate() batch)
        self.running_scores = torch.zeros(R, nb, dtype=torch.float32, device=device)
        self.beam_scores = torch.full((R, nb), _BIG, dtype=torch.float32, device=device)
        self.finished = torch.zeros(R, nb, dtype=torch.bool, device=device)
        self.open = torch.ones(R, 1, dtype=torch.bool, device=device)  # early-stop heuristic unsatisfied
        self.done = torch.zeros(R, dtype=torch.bool, device=device)
        self.hyps = torch.zeros(R, nb, L, **i64)  # finished hypotheses' tokens
        self.running_bidx = torch.full((R, nb, L), -1, dtype=torch.int32, device=device)
        self.beam_indices = torch.full((R, nb, L), -1, dtype=torch.int32, device=device)
        self.top_nb = torch.arange(self.K, device=device) < nb
        self.n_active = 0  # host count of active slots (a group with none is skipped by the step)

    def start(self, slot: int, tokens: torch.Tensor, *, prompt: int, max_length: int, length_penalty: float,
              early_stopping, offset: int = 0):
        """Slot `slot` begins a request on its decode rows, whose tokens (nb, Lc) hold the prompt and
        then transformers' fill value (pad, else eos, else -1)."""
        self.n_active += 1
        self.active[slot] = True
        self.prompt[slot], self.max_length[slot] = prompt, max_length
        self.length_penalty[slot] = float(length_penalty)
        self.early_true[slot] = early_stopping is True
        self.never_lp[slot] = early_stopping == "never" and length_penalty > 0.0
        self.offset[slot] = offset
        self.running_scores[slot] = _BIG
        self.running_scores[slot, 0] = 0.0
        self.beam_scores[slot] = _BIG
        self.finished[slot] = False
        self.open[slot] = True
        self.done[slot] = False
        self.hyps[slot] = tokens
        self.running_bidx[slot] = -1
        self.beam_indices[slot] = -1

    def grow(self, seq_cap: int):
        """More token slots per beam (content kept)."""
        R, nb, L = self.hyps.shape
        if seq_cap <= L:
            return
        for name, fill in (("hyps", 0), ("running_bidx", -1), ("beam_indices", -1)):
            old = getattr(self, name)
            new = old.new_full((R, nb, seq_cap), fill)
            new[:, :, :L] = old
            setattr(self, name, new)

    def stop(self, slot: int):
        self.n_active -= 1
        self.active[slot] = False

    def clear(self):
        """No active slot (a state reused by another generate() call)."""
        self.n_active = 0
        self.active.zero_()
        self.done.zero_()

    def step(self, logits: torch.Tensor, seq: torch.Tensor, t: torch.Tensor, tables, spec, dops, *,
             scores: torch.Tensor | None = None, draws=(), ranked: bool = False, extra_hits=None) -> torch.Tensor:
        """One beam step for every active slot. logits (N, V): the decoder's logits of all decode rows,
        whose processed log-probs (tables, spec: decode/select.py) dops.select_beam (decode/ops.py) ranks;
        seq (N, Lc) the decode rows' tokens (written here: running beams take their parents' tokens
        and the new one at index t); t (N,) tokens per row before this step.
        draws: beam sampling, [(slots, generator)]: each entry's slots (a slice or a list of slot indices)
        draw their candidates in one multinomial with that generator (None: torch's global one), from
        scores (N, V), the processed log-probs (read only then); the other slots take the top K.
        ranked: the top K are taken from `scores` (processed on the host by the caller's processors) instead
        of select_beam's own processing of the logits. extra_hits(candidate tokens (R, K, Lc), scores) ->
        (R, K) bool: candidates that stop besides eos and max_length (the caller's stopping criteria).
        Returns parents (N,) long: decode row n continues row parents[n] (n itself outside beams),
        for the caller to move the cache and per-row state."""
        rows = self.rows  # (R, nb)
        live = self.active & ~self.done  # a finished request waits, unchanged, for its caller
        cur = t[rows[:, 0]].clamp(max=seq.shape[1] - 1)  # (R,) tokens in each slot's running beams
        if ranked:
            top_lp, top_idx = torch.topk(self._accumulated(scores, slice(None)), k=self.K)
        else:
            top_lp, top_idx = dops.select_beam(logits, seq, t, tables, spec, self.running_scores, self.K)
        for slots, generator in draws:
            self._draw(top_lp, top_idx, scores, slots, generator)
        V = logits.shape[1]
        src, tok = top_idx // V, top_idx % V  # (R, K): the beam each continuation extends, its token
        run_seq = seq[rows]  # (R, nb, Lc)
        top_seq, top_bidx = self._extend(run_seq, src, tok, cur)
        # which continuations stop: eos, or max_length reached
        hits = is_eos(tok.reshape(-1), tables.eos[rows[:, :1].expand(self.R, self.K).reshape(-1)]).view(self.R, self.K)
        hits = hits | (cur + 1 >= self.max_length)[:, None]
        if extra_hits is not None:
            hits = hits | extra_hits(top_seq, scores)
        parent_beam, new_seq = self._keep_running(top_lp, hits, src, top_seq, top_bidx, live)
        self._merge_finished(top_lp, hits, top_seq, top_bidx, cur, live)
        self._update_done(hits, cur, live)
        # the running beams' tokens move to their decode rows; the caller moves their caches
        act = live[:, None]
        flat = rows.reshape(-1)
        seq[flat] = torch.where(act[..., None], new_seq, run_seq).reshape(self.R * self.nb, -1)
        parents = torch.arange(logits.shape[0], device=logits.device)
        parents[flat] = torch.where(act, rows.gather(1, parent_beam), rows).reshape(-1)
        return parents

    def _draw(self, top_lp, top_idx, scores, slots, generator):
        """Beam sampling: the slots' K candidates drawn without replacement, in one multinomial as transformers
        draws a batch's, sorted by score, in place of their top K."""
        acc = self._accumulated(scores, slots)
        idx = torch.multinomial(sampling_probs(acc), num_samples=self.K, generator=generator)
        lp, order = torch.gather(acc, 1, idx).sort(dim=-1, descending=True)
        top_lp[slots], top_idx[slots] = lp, idx.gather(-1, order)

    def _accumulated(self, scores, slots):
        """The slots' running scores plus each beam's processed log-probs: (slots, nb * V), index beam * V + token."""
        return (scores[self.rows[slots]] + self.running_scores[slots, :, None]).flatten(1)

    def _extend(self, run_seq, src, tok, cur):
        """Each candidate's tokens (its parent's, then its token at cur) and beam indices (R, K, Lc)."""
        R, K = self.R, self.K
        top_seq = _gather(run_seq, src)  # (R, K, Lc)
        top_seq.scatter_(2, cur.view(R, 1, 1).expand(R, K, 1), tok.unsqueeze(-1))
        s = cur - self.prompt  # index of this step in beam_indices
        top_bidx = _gather(self.running_bidx, src)
        top_bidx.scatter_(2, s.view(R, 1, 1).expand(R, K, 1), (src + self.offset).to(torch.int32).unsqueeze(-1))
        return top_seq, top_bidx

    def _keep_running(self, top_lp, hits, src, top_seq, top_bidx, live):
        """The running beams for the next step: the best num_beams candidates that did not stop.
        -> (parent beam (R, nb), their tokens (R, nb, Lc))."""
        top_running_lp = top_lp + hits.to(torch.float32) * _BIG
        keep = torch.topk(top_running_lp, k=self.nb)[1]
        self.running_scores.copy_(torch.where(live[:, None], _gather(top_running_lp, keep), self.running_scores))
        self.running_bidx.copy_(torch.where(live[:, None, None], _gather(top_bidx, keep), self.running_bidx))
        return _gather(src, keep), _gather(top_seq, keep)

    def _merge_finished(self, top_lp, hits, top_seq, top_bidx, cur, live):
        """The candidates that stopped among the top num_beams join the finished hypotheses, with the length
        penalty (the best num_beams of both are kept)."""
        just = hits & self.top_nb[None, :]
        denom = ((cur + 1 - self.prompt).to(torch.float64) ** self.length_penalty).to(torch.float32)
        cand = top_lp / denom[:, None]
        full = torch.all(self.finished, dim=-1, keepdim=True) & self.early_true[:, None]
        cand = cand + full.to(torch.float32) * _BIG
        cand = cand + (~self.open).to(torch.float32) * _BIG
        cand = cand + (~just) * _BIG
        merged = torch.topk(torch.cat((self.beam_scores, cand), dim=1), k=self.nb)[1]
        act = live[:, None]
        self.hyps.copy_(torch.where(act[..., None], _gather(torch.cat((self.hyps, top_seq), 1), merged), self.hyps))
        self.beam_scores.copy_(torch.where(act, _gather(torch.cat((self.beam_scores, cand), 1), merged), self.beam_scores))
        self.beam_indices.copy_(torch.where(act[..., None], _gather(torch.cat((self.beam_indices, top_bidx), 1), merged),
                                            self.beam_indices))
        self.finished.copy_(torch.where(act, _gather(torch.cat((self.finished, just), 1), merged), self.finished))

    def _update_done(self, hits, cur, live):
        """Can the running beams still beat the finished ones (transformers' early-stop heuristic)? A slot
        is done when not; with joint, every slot when no slot can improve (transformers' batch condition)."""
        act = live[:, None]
        best_len = torch.where(self.never_lp, self.max_length - self.prompt, cur + 1 - self.prompt).to(torch.float64)
        best_running = self.running_scores[:, :1] / (best_len ** self.length_penalty).to(torch.float32)[:, None]
        worst = torch.where(self.finished, torch.min(self.beam_scores, dim=1, keepdim=True)[0], _BIG)
        self.open &= torch.any(best_running > worst, dim=-1, keepdim=True) | ~act
        all_hits = hits.all(-1)
        if self.joint:  # transformers' batch-level condition, over the active slots
            improvable = torch.any(self.open[:, 0] & live)
            open_beam = ~(torch.all(self.finished | ~act) & torch.any(self.early_true & live))
            go_on = improvable & open_beam & ~torch.all(all_hits | ~live)
            done = (~go_on).expand(self.R)
        else:
            open_beam = ~(torch.all(self.finished, dim=-1) & self.early_true)
            done = ~(self.open[:, 0] & open_beam & ~all_hits)
        self.done |= live & done
