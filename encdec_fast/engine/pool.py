"""Continuous batching for the engine: requests join and leave one decode state between steps.

The pool owns a decode/state.py DecodeState of `slots` rows: the same state and step generate() runs,
so a request's tokens are those of model.generate on it alone. A request takes rows (one per
returned sequence, or num_beams rows for beam search: an aligned block, as decode/beam.py lays out
its slots), its encoder output is projected once into the cross-K/V row of its first row (its other
rows point at it through kv_index), and its logits processors run from per-row settings.

The host looks at the state only every `check_every` steps (1 on CPU, 16 on CUDA): one read of the
rows' stop marks tells which requests finished; their tokens are read then, their rows freed, and
waiting requests join before the next steps. Between looks nothing waits for the host: on CUDA the
greedy step is one CUDA-graph replay; a sampling request draws its tokens with its own
torch.Generator between the captured decoder and the commit (seed=s reproduces
`torch.manual_seed(s); model.generate(...)`), without a sync.

Capacities (token slots per row, encoder positions per cross row) grow with the longest request seen
so far, in multiples of 64; growing drops the captured graphs, which are captured again.

A request whose running rows got NaN/inf logits (the state's nonfinite flags, read in the same look as
the stop marks) fails alone with NumericalError; the others go on.
"""

from __future__ import annotations

import torch

from .. import validate
from ..decode import select as sel
from ..decode.search import beam_results
from ..decode.state import DecodeState

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
    """A request in the pool: its rows, its beam slot (beam search), its progress as the host knows it."""

    __slots__ = ("req", "rows", "rows_t", "group", "slot", "t", "generator")

    def __init__(self, req, rows: list[int], device, group=None, slot=None, generator=None):
        self.req, self.rows, self.group, self.slot, self.generator = req, rows, group, slot, generator
        self.rows_t = torch.tensor(rows, dtype=torch.long, device=device)
        self.t = 1  # tokens each row holds: the decoder start


class DecodePool:
    def __init__(self, model, slots: int, max_batch_tokens: int, check_every: int | None = None, on_tokens=None):
        """on_tokens(req, new_rows): gets a streamed request's new tokens (one list per row) whenever they
        reach the host (every look); a request whose req.cancelled is set leaves at the next look."""
        self.model, self.N, self.max_batch_tokens = model, slots, max_batch_tokens
        self.on_tokens = on_tokens
        self.enc_pad = model.cfg.encoder.pad_token_id or 0
        self.dev = model.device
        capture = self.dev.type == "cuda" and getattr(model, "cuda_graphs", False)
        self.state = DecodeState(model, slots, _GROW, slots, _GROW, capture=capture)  # one arena slot per row
        self.check_every = check_every or (1 if self.dev.type == "cpu" else 16)
        self.free_rows = set(range(slots))
        self.reserved: dict[int, list[int]] = {}  # id(request) -> rows set aside by reserve()
        self.lives: list[Live] = []
        self.configs: dict = {}  # every selection setting seen: the step's processor spec only grows
        self.steps = self.rows_stepped = 0

    # -- capacity ------------------------------------------------------------------------------
    @property
    def free(self) -> int:
        return len(self.free_rows)

    def _rows_for(self, req) -> list[int] | None:
        """Free rows for req: any req.rows rows; beam search an aligned block of num_beams rows."""
        if req.num_beams == 1:
            if req.rows > len(self.free_rows):
                return None
            return sorted(self.free_rows)[:req.rows]
        nb = req.num_beams
        for slot in range(self.N // nb):
            block = list(range(slot * nb, (slot + 1) * nb))
            if all(r in self.free_rows for r in block):
                return block
        return None

    def reserve(self, req) -> bool:
        """Sets rows aside for req if enough are free (admit gives them to it, or unreserve frees them)."""
        rows = self._rows_for(req)
        if rows is None:
            return False
        self.free_rows.difference_update(rows)
        self.reserved[id(req)] = rows
        return True

    def unreserve(self, req):
        self.free_rows.update(self.reserved.pop(id(req), ()))

    # -- joining ---------------------------------------------------------------------------------
    def admit(self, reqs: list) -> list:
        """Encodes reqs (each holding rows from reserve) in packed micro-batches of at most
        max_batch_tokens real source tokens, writes their cross K/V and gives them rows. Returns
        [(req, exc)] for the requests that failed (a failing micro-batch fails only its own requests)."""
        failed = []
        for chunk in token_chunks(reqs, lambda r: len(r.ids), self.max_batch_tokens, self.N):
            try:
                self._join(chunk)
            except Exception as e:  # noqa: BLE001  (reported on the requests' futures)
                failed += [(r, e) for r in chunk]
                for r in chunk:
                    self.unreserve(r)
        return failed

    def _join(self, chunk: list):
        model, st = self.model, self.state
        net, ops = model.net, model.ops
        ids, mask = pad_batch([r.ids for r in chunk], self.enc_pad, self.dev)
        enc, packing = model.encode_packed(ids, mask)  # (T, E): real source tokens only
        cross = net.decoder.cross_kv(net.project(enc, ops), ops)  # per layer (K, V) each (T, H, D)
        st.grow(_round_up(max(r.max_length for r in chunk), _GROW), _round_up(packing.max_seqlen, _GROW))
        rows = [self.reserved[id(r)] for r in chunk]
        first = torch.tensor([rw[0] for rw in rows], dtype=torch.long, device=self.dev)  # each request's arena slot
        row, offset = packing.rows_and_offsets()
        st.set_cross(first[row] * st.Sc + offset, cross)  # a request's tokens at the front of its slot
        started = []
        try:  # all or nothing: a request of a failed chunk must not stay in the state
            for r, rw in zip(chunk, rows):
                started.append(self._start(r, rw))
        except BaseException:
            for lv in started:
                self._release(lv, free=False)  # admit() gives the reserved rows back
            raise
        for r, lv in zip(chunk, started):
            self.lives.append(lv)
            del self.reserved[id(r)]
            self.configs.setdefault(r.select.key(), r.select)
        st.spec = sel.Spec.of(self.configs.values())

    def _start(self, r, rows: list[int]) -> Live:
        st = self.state
        rows_t = torch.tensor(rows, dtype=torch.long, device=self.dev)
        prefix = torch.full((len(rows), 1), r.start, dtype=torch.long, device=self.dev)
        group = slot = beam = generator = None
        if r.num_beams > 1:
            group = st.beam_group(r.num_beams, len(r.eos or ()), joint=False)
            slot = rows[0] // r.num_beams
            beam = (group, slot, dict(length_penalty=r.gc.length_penalty, early_stopping=r.gc.early_stopping))
        elif r.gc.do_sample:
            generator = torch.Generator(device=self.dev)
            generator.manual_seed(r.seed)
        st.join(rows_t, prefix, r.select, enc_start=rows[0] * st.Sc, enc_len=len(r.ids), limit=r.max_length,
                fill=r.fill, beam=beam)
        return Live(r, rows, self.dev, group, slot, generator)

    # -- stepping ----------------------------------------------------------------------------------
    def _choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Greedy for every row, then each sampling request's rows draw with its own generator."""
        toks = sel.greedy(scores)
        for lv in self.lives:
            if lv.generator is not None:
                toks[lv.rows_t] = sel.sample(scores[lv.rows_t], lv.generator)
        return toks

    def advance(self) -> list:
        """Up to check_every steps, then one look at the stop marks. Returns [(request, rows as lists of
        ids)] for the requests that finished (beam search: its returned hypotheses), and [(request,
        NumericalError)] for those whose logits turned NaN or inf."""
        st = self.state
        sampling = any(lv.generator is not None for lv in self.lives)
        for _ in range(self.check_every):
            extent = None
            if not (st.capture or self.model.static_decode):  # eager: only the rows, slots and positions in use
                extent = (max(max(lv.rows) for lv in self.lives) + 1, max(lv.t for lv in self.lives))
            st.step(choose=self._choose if sampling else None, extent=extent,
                    filled=max(lv.t for lv in self.lives))
            self.steps += 1
            self.rows_stepped += sum(len(lv.rows) for lv in self.lives)
            for lv in self.lives:
                lv.t = min(lv.t + 1, lv.req.max_length)
            if all(lv.t >= lv.req.max_length for lv in self.lives):
                break
        return self._collect()

    def _collect(self) -> list:
        st = self.state
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
                seqs, _, _ = beam_results(lv.group, [lv.slot], lv.req.returned, 1, lv.req.max_length)
                rows = seqs.tolist()
            else:
                rows = self.state.seq[lv.rows_t, :max(marks)].tolist()
            out.append((lv.req, rows))
            self._release(lv)
        return out

    def _stream(self, lives: list):
        """Streamed requests still running get their rows' tokens since the last look (every row the same
        count: a finished row's padding included, as the final result holds it); beam search's running
        beams are not final, so a beam request streams its result when it finishes."""
        for lv in lives:
            req = lv.req
            if req.stream is None or lv.group is not None or lv.t <= 1 + req.streamed:
                continue
            self.on_tokens(req, self.state.seq[lv.rows_t, 1 + req.streamed:lv.t].tolist())

    def _release(self, lv: Live, free: bool = True):
        self.state.leave(lv.rows_t)
        if lv.group is not None:
            lv.group.stop(lv.slot)
        if free:
            self.free_rows.update(lv.rows)

    def clear(self) -> list:
        """Drops every request in the pool (after a failed step, or at shutdown); returns them."""
        reqs = [lv.req for lv in self.lives]
        for lv in self.lives:
            self._release(lv)
        self.lives = []
        return reqs
