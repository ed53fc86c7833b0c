"""Continuous batching for the engine: requests join and leave one decode state between steps.

The pool executes what the scheduler decides: it owns a decode/state.py DecodeState of `slots` rows and
its decode/runner.py StepRunner (the same state, step and runner generate() uses), so a request's tokens
are those of model.generate on it alone. The scheduler gives each request its rows (one per returned
sequence, or num_beams rows for beam search: an aligned block, as decode/beam.py lays out its slots);
its encoder output is projected once into the arena slot of its first row (its other rows read that
slot), and its logits processors run from per-row settings.

The host looks at the state only every `check_every` steps (1 on CPU, 16 on CUDA): one read of the
rows' stop marks tells which requests finished; their tokens are read then, their rows freed, and
waiting requests join before the next steps. Between looks nothing waits for the host: on CUDA the
greedy step is one CUDA-graph replay; a sampling request draws its tokens with its own torch.Generator
between the captured decoder and the commit (beam sampling: its beams' candidates), without a sync.

Capacities (token slots per row, encoder positions per arena slot) grow with the longest request seen
so far, in multiples of 64; growing makes the runner capture its steps again.

A request whose running rows got NaN/inf logits (the state's nonfinite flags, read in the same look as
the stop marks) fails alone with NumericalError; the others go on.

Stop strings (a request's stop=, resolved into transformers' StopStringCriteria by decode/host.py) are
checked on the host at each look, for every step since the last one, as transformers checks them after
each token: a row stops at the token that completes one (DecodeState.stop_rows; what it generated past
it, between looks, becomes padding), so its tokens, and its streamed chunks, end where model.generate's do.
"""

from __future__ import annotations

import torch

from .. import validate
from ..decode import host as host_mod
from ..decode import select as sel
from ..decode.runner import StepRunner
from ..decode.search import beam_results
from ..decode.state import DecodeState
from ..decode.step import StepPlan

_GROW = 64  # capacities grow in multiples of this many positions


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def token_chunks(items: list, length, max_tokens: int, max_rows: int) -> list[list]:
    """Sorts items by length and cuts them into runs of at most max_tokens real tokens and max_rows rows:
    the packed encoder computes real tokens only, so padding costs nothing there (similar lengths still
    go together: the varlen kernel's grid follows the longest). An item longer than max_tokens goes alone."""
    out, cur, cur_tokens = [], [], 0
    for it in sorted(items, key=length):
        n = length(it)
        if cur and (cur_tokens + n > max_tokens or len(cur) + 1 > max_rows):
            out.append(cur)
            cur, cur_tokens = [], 0
        cur.append(it)
        cur_tokens += n
    if cur:
        out.append(cur)
    return out


def pad_batch(seqs: list[list[int]], pad: int, device):
    """Right-padded (B, S) ids and a bool mask (None when no row is padded)."""
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), S, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = True
    full = all(len(s) == S for s in seqs)
    return ids.to(device), (None if full else mask.to(device))


class Live:
    """A request in the pool: its rows, its beam group and slot (beam search), its generator (sampling)."""

    __slots__ = ("req", "rows", "rows_t", "group", "slot", "generator", "checked")

    def __init__(self, req, rows: list[int], device, group=None, slot=None, generator=None):
        self.req, self.rows, self.group, self.slot, self.generator = req, rows, group, slot, generator
        self.rows_t = torch.tensor(rows, dtype=torch.long, device=device)
        self.checked = req.params.prompt_len  # tokens its stop strings were checked up to


class DecodePool:
    def __init__(self, model, slots: int, max_batch_tokens: int, check_every: int | None = None, on_tokens=None,
                 on_free=None):
        """on_tokens(req, new_rows): gets a streamed request's new tokens (one list per row) whenever they
        reach the host (every look); on_free(rows): rows a request left (the scheduler allocates them). A
        request whose req.cancelled is set leaves at the next look."""
        self.model, self.max_batch_tokens = model, max_batch_tokens
        self.on_tokens, self.on_free = on_tokens, on_free
        self.enc_pad = model.cfg.encoder.pad_token_id or 0
        self.dev = model.device
        capture = self.dev.type == "cuda" and getattr(model, "cuda_graphs", False)
        self.state = DecodeState(model, slots, _GROW, slots, _GROW)  # one arena slot per row
        self.runner = StepRunner(self.state, capture=capture, graph_shaped=model.graph_shapes)
        self.check_every = check_every or (1 if self.dev.type == "cpu" else 16)
        self.lives: list[Live] = []
        self.configs: dict = {}  # every selection setting seen: the step's processor spec only grows
        self.steps = self.rows_stepped = 0

    # -- joining ---------------------------------------------------------------------------------
    def admit(self, taken: list) -> list:
        """Encodes the requests of taken ([(request, its rows)]) in packed micro-batches of at most
        max_batch_tokens real source tokens, writes their cross K/V and starts them on their rows. Returns
        [(req, exc)] for the requests that failed (a failing micro-batch fails only its own requests; their
        rows are not freed here: the scheduler still holds them)."""
        failed = []
        for chunk in token_chunks(taken, lambda rt: len(rt[0].ids), self.max_batch_tokens, self.state.rows):
            try:
                self._join(chunk)
            except Exception as e:  # noqa: BLE001  (reported on the requests' futures)
                failed += [(r, e) for r, _ in chunk]
        return failed

    def _join(self, chunk: list):
        model, st = self.model, self.state
        net, ops = model.net, model.ops
        ids, mask = pad_batch([r.ids for r, _ in chunk], self.enc_pad, self.dev)
        enc, packing = model.encode_packed(ids, mask)  # (T, E): real source tokens only
        cross = net.decoder.cross_kv(net.project(enc, ops), ops)  # per layer (K, V) each (T, H, D)
        st.grow(_round_up(max(r.params.max_length for r, _ in chunk), _GROW), _round_up(packing.max_seqlen, _GROW))
        first = torch.tensor([rows[0] for _, rows in chunk], dtype=torch.long, device=self.dev)  # arena slots
        row, offset = packing.rows_and_offsets()
        st.set_cross(first[row] * st.enc_cap + offset, cross)  # a request's tokens at the front of its slot
        started = []
        try:  # all or nothing: a request of a failed chunk must not stay in the state
            for r, rows in chunk:
                started.append(self._start(r, rows))
        except BaseException:
            for lv in started:
                self._release(lv, free=False)  # the scheduler gives the rows back
            raise
        for (r, _), lv in zip(chunk, started):
            self.lives.append(lv)
            self.configs.setdefault(r.params.select.key(), r.params.select)

    def _start(self, r, rows: list[int]) -> Live:
        st, p = self.state, r.params
        prefix = p.prefix.expand(len(rows), -1)
        group = slot = beam = generator = None
        if p.num_beams > 1:
            group = st.beam_group(p.num_beams, len(p.eos or ()), joint=False)
            slot = rows[0] // p.num_beams
            beam = (group, slot, dict(length_penalty=p.gc.length_penalty, early_stopping=p.gc.early_stopping))
        if p.do_sample:
            generator = torch.Generator(device=self.dev)
            generator.manual_seed(r.seed)
        st.join(rows, prefix, p.select, enc_start=rows[0] * st.enc_cap, enc_len=len(r.ids), limit=p.max_length,
                fill=p.fill, beam=beam)
        return Live(r, rows, self.dev, group, slot, generator)

    # -- stepping ----------------------------------------------------------------------------------
    def _plan(self) -> StepPlan:
        """The step the live requests need (decode/step.py)."""
        return StepPlan(spec=sel.Spec.of(self.configs.values()),
                        plain=any(lv.group is None for lv in self.lives),
                        beams=tuple(sorted({lv.group.key for lv in self.lives if lv.group is not None})),
                        sample=any(lv.generator is not None and lv.group is None for lv in self.lives),
                        beam_sample=any(lv.generator is not None and lv.group is not None for lv in self.lives))

    def _choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Greedy for every row, then each sampling request's rows draw with its own generator."""
        toks = sel.greedy(scores)
        for lv in self.lives:
            if lv.generator is not None and lv.group is None:
                toks[lv.rows_t] = sel.sample(scores[lv.rows_t], lv.generator)
        return toks

    def advance(self) -> list:
        """Up to check_every steps, then one look at the stop marks. Returns [(request, (rows as lists of
        ids, each row's length when it stopped or None))] for the requests that finished (beam search: its
        returned hypotheses), and [(request, NumericalError)] for those whose logits turned NaN or inf."""
        st = self.state
        plan = self._plan()
        draws = [(lv.group, [lv.slot], lv.generator) for lv in self.lives
                 if lv.generator is not None and lv.group is not None]
        for _ in range(self.check_every):
            self.runner.step(plan, choose=self._choose if plan.sample else None, draws=draws)
            self.steps += 1
            self.rows_stepped += len(st.busy_rows)
            if all(st.held[lv.rows[0]] >= lv.req.params.max_length for lv in self.lives):
                break
        return self._collect()

    def _collect(self) -> list:
        st = self.state
        self._stop_strings()
        stop_t = torch.where(st.nonfinite, -1, st.stop_t).tolist()  # the one host sync per look; -1: NaN/inf
        done, keep, bad = [], [], []
        for lv in self.lives:
            marks = [stop_t[r] for r in lv.rows]
            if lv.req.cancelled:  # its stream was closed or its future cancelled: its rows are free now
                self._release(lv)
            elif any(m < 0 for m in marks):
                bad.append(lv)
            else:
                (done if all(m > 0 for m in marks) else keep).append((lv, marks))
        self.lives = [lv for lv, _ in keep]
        self._stream([lv for lv, _ in keep])
        out = []
        for lv in bad:
            out.append((lv.req, validate.nonfinite_error()))
            self._release(lv)
        for lv, marks in done:
            if lv.group is not None:
                p = lv.req.params
                seqs, _, _ = beam_results(lv.group, [lv.slot], p.num_return_sequences, 1, p.max_length)
                out.append((lv.req, (seqs.tolist(), None)))
            else:  # each row's stop mark: the tokens it held when it stopped
                out.append((lv.req, (self.state.seq[lv.rows_t, :max(marks)].tolist(), marks)))
            self._release(lv)
        return out

    def _stop_strings(self):
        """Requests with stop strings: the steps since the last look, checked on the host (see the module
        docstring)."""
        st = self.state
        for lv in self.lives:
            host = lv.req.params.host
            if host is None or not host.criteria or lv.req.cancelled:
                continue
            t = st.held[lv.rows[0]]
            if t > lv.checked:
                hit, lengths = host_mod.first_hits(host.criteria, st.seq[lv.rows_t, :t], lv.checked + 1)
                st.stop_rows([lv.rows[i] for i in hit], lengths, pad=host.pad_stopped)
                lv.checked = t

    def _stream(self, lives: list):
        """Streamed requests still running get their rows' tokens since the last look (every row the same
        count: a finished row's padding included, as the final result holds it); beam search's running
        beams are not final, so a beam request streams its result when it finishes."""
        for lv in lives:
            req, t = lv.req, self.state.held[lv.rows[0]]
            if req.stream is None or lv.group is not None or t <= 1 + req.streamed:
                continue
            self.on_tokens(req, self.state.seq[lv.rows_t, 1 + req.streamed:t].tolist())

    def _release(self, lv: Live, free: bool = True):
        self.state.leave(lv.rows)
        if lv.group is not None:
            lv.group.stop(lv.slot)
        if free:
            self.on_free(lv.rows)

    def clear(self) -> list:
        """Drops every request in the pool (after a failed step, or at shutdown); returns them."""
        reqs = [lv.req for lv in self.lives]
        for lv in self.lives:
            self._release(lv)
        self.lives = []
        return reqs
