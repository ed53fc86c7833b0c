"""Decode state: every buffer a set of decode rows needs, and the one step over them.

generate() (greedy, sampling, beam search) and the Engine's continuous batching both run this step.
A row serves one sequence of one request; the rows of a request (beams, returned sequences) share
that request's cross-attention K/V (rows of one request read the same span). All of it lives on the
device, preallocated:

  seq      (N, Lc) long          each row's tokens (decoder start, prefix, generated)
  t        (N,) long             tokens a row holds; the last one, seq[n, t-1], is fed next
  cache    (2, layers, N, Lc, H, D)  self-attention K/V; slot j holds token j's K/V
  cross    per layer (K, V) (Tc, H, D): the packed encoder states' projections, each request's real
           tokens back to back (no padding); row n reads keys [cross_start[n], + enc_lens[n])
  tables   per-row selection settings and state (decode/select.py)
  beams    beam bookkeeping of requests searched with beams (decode/beam.py)
  alive, limit, stop_t, busy     rows still generating, their max_length, the length at which they
                                 stopped (eos or max_length), rows in use
  nonfinite (N,) bool            a running row got NaN/inf logits (float16 overflow...): its request
                                 fails with NumericalError instead of emitting junk (validate.py)

One step = the decoder over every row (all layers + LM head) -> the logits processors -> token choice
(greedy argmax; sampled rows draw between `forward` and `commit`; beams choose in decode/beam.py) ->
tokens written, finished flags updated, beam caches moved. Greedy and beam choice go through the op
table (decode/ops.py's select_greedy / select_beam, which run the processors themselves, fused in the csrc kernels);
`forward` materialises processed scores only for what else reads them (sampling, keep_scores). Nothing reads the host: a caller looks at
the flags only every few steps, and a late look loses nothing because `stop_t` records where each row
stopped (extra steps only append padding past it).

On CUDA the step is captured as a CUDA graph (once per key: shapes, processor spec, beam layout) and
replayed; every buffer it touches keeps its address for the life of the state. A graph is dropped
when a buffer is reallocated (growth, a new table). `capture=False` runs the very same step eagerly,
which is what the CPU tests exercise.

Beam search moves caches physically: a step copies the filled prefix of the beam rows (as far as the
host knows it without a sync; a captured step rounds it up to a multiple of 64 slots, one graph each).
"""

from __future__ import annotations

import time

import torch

from ..config import StackConfig
from . import ops as decode_ops
from . import select as sel
from .beam import BeamGroup


class KVCache:
    """Self-attention K/V for `rows` decode rows and up to `max_len` tokens."""

    def __init__(self, cfg: StackConfig, rows: int, max_len: int, *, dtype: torch.dtype, device):
        H, D = cfg.num_heads, cfg.head_dim
        # zeros, not empty: slots past the written prefix are masked out of attention, but a masked
        # probability of 0 times a NaN left in uninitialised memory would still be NaN
        self.buf = torch.zeros(2, cfg.num_layers, rows, max_len, H, D, dtype=dtype, device=device)
        self.k = list(self.buf[0].unbind(0))  # per layer (rows, max_len, H, D)
        self.v = list(self.buf[1].unbind(0))

    @property
    def layers(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(k_list, v_list): the `cache` argument of Decoder.step."""
        return self.k, self.v

    def move(self, rows: torch.Tensor, parents: torch.Tensor, length: int | None) -> None:
        """Row rows[i] takes the cache of row parents[i] (beam search), for the filled prefix [:length]
        (None: every slot). Gathers into a temporary, so the per-layer views stay valid. On the CPU (no graph
        to keep static) only the rows whose parent is another row are copied: a beam that stays on its own
        path keeps its cache where it is."""
        if rows.device.type == "cpu":
            moved = parents != rows
            if not bool(moved.any()):
                return
            rows, parents = rows[moved], parents[moved]
        filled = self.buf if length is None else self.buf[:, :, :, :length]  # (2, layers, rows, length, H, D)
        filled[:, :, rows] = filled[:, :, parents]


class DecodeState:
    """Buffers for `rows` decode rows of up to `seq_cap` tokens each and a cross-K/V arena of
    `enc_slots` x `enc_cap` encoder tokens (generate(): one slot holding the whole packed batch; the
    Engine: one slot of enc_cap tokens per decode row, which grow() widens); see the module docstring."""

    def __init__(self, model, rows: int, seq_cap: int, enc_slots: int, enc_cap: int, *, capture: bool = False):
        t0 = time.perf_counter()
        self.model, self.decoder, self.ops = model, model.net.decoder, model.ops
        self.dops = decode_ops.table(model.backend)
        dcfg = model.cfg.decoder
        self.N, self.Lc, self.Be, self.Sc = rows, seq_cap, enc_slots, enc_cap
        self.dev, self.dtype, self.V = model.device, model.dtype, dcfg.vocab_size
        i64 = dict(dtype=torch.long, device=self.dev)
        self.seq = torch.zeros(rows, seq_cap, **i64)
        self.t = torch.ones(rows, **i64)
        self.limit = torch.full((rows,), seq_cap, **i64)
        self.stop_t = torch.zeros(rows, **i64)  # 0 while the row runs
        self.alive = torch.zeros(rows, dtype=torch.bool, device=self.dev)
        self.busy = torch.zeros(rows, dtype=torch.bool, device=self.dev)
        self.nonfinite = torch.zeros(rows, dtype=torch.bool, device=self.dev)
        self.is_beam = torch.zeros(rows, dtype=torch.bool, device=self.dev)
        self.beam_done = torch.zeros(rows, dtype=torch.bool, device=self.dev)  # no beam request done (no groups)
        self.steps = torch.zeros((), **i64)  # steps taken since the last reset_clock()
        self.all_stopped_at = torch.zeros((), **i64)  # step at which every busy row had stopped (0: not yet)
        self.cache = KVCache(dcfg, rows, seq_cap, dtype=self.dtype, device=self.dev)
        self._alloc_cross(dcfg)
        self.cross_start = torch.zeros(rows, **i64)  # row n's encoder keys start at arena token cross_start[n]
        self.enc_lens = torch.ones(rows, dtype=torch.int32, device=self.dev)
        self.enc_bound = enc_cap  # an upper bound on enc_lens known to the host (the torch reference's window)
        self.tables = sel.RowTables(rows, self.V, self.dev)
        self.groups: dict[tuple, BeamGroup] = {}  # (num_beams, K) -> group
        self.busy_rows = 0  # host count of the rows serving a request
        self.spec = sel.Spec()
        self.capture = capture and self.dev.type == "cuda"
        self.static = self.capture or model.static_decode  # steps as a graph runs them (the CPU tests' way)
        self.graphs: dict = {}
        self.captures, self.capture_seconds = 0, 0.0
        self.scores = self.logits = None
        self.setup_seconds = time.perf_counter() - t0

    def _alloc_cross(self, dcfg):
        kv = torch.zeros(2, dcfg.num_layers, self.Be * self.Sc, dcfg.num_heads, dcfg.head_dim, dtype=self.dtype,
                         device=self.dev)
        self.cross_buf = kv
        self.cross = [(kv[0, i], kv[1, i]) for i in range(dcfg.num_layers)]  # each (Tc, H, D)

    # -- capacity ------------------------------------------------------------------------------------
    def grow(self, seq_cap: int, enc_cap: int):
        """More token slots per row / encoder positions per row, content kept (drops captured graphs)."""
        if seq_cap > self.Lc:
            seq = self.seq.new_zeros(self.N, seq_cap)
            seq[:, :self.Lc] = self.seq
            cache = KVCache(self.model.cfg.decoder, self.N, seq_cap, dtype=self.dtype, device=self.dev)
            cache.buf[:, :, :, :self.Lc] = self.cache.buf
            self.seq, self.cache, self.Lc = seq, cache, seq_cap
            for g in self.groups.values():  # beam buffers are per token slot too
                g.grow(seq_cap)
            self.graphs.clear()
        if enc_cap > self.Sc:  # every slot keeps its tokens at its front: slot b moves from b*S to b*enc_cap
            old, S = self.cross_buf, self.Sc
            self.Sc = self.enc_bound = enc_cap
            self._alloc_cross(self.model.cfg.decoder)
            self.cross_buf.unflatten(2, (self.Be, enc_cap))[:, :, :, :S] = old.unflatten(2, (self.Be, S))
            self.cross_start.copy_(self.cross_start // S * enc_cap)
            self.graphs.clear()

    @property
    def live_groups(self) -> list[BeamGroup]:
        """The beam groups with an active request (host-side knowledge: no sync)."""
        return [g for g in self.groups.values() if g.n_active]

    @property
    def plain_rows(self) -> int:
        """Busy rows outside beam groups, which commit chooses for (host-side knowledge: no sync)."""
        return self.busy_rows - sum(g.n_active * g.nb for g in self.live_groups)

    def beam_group(self, num_beams: int, n_eos: int, *, joint: bool) -> BeamGroup:
        """The group serving requests with num_beams beams and n_eos eos ids (created on first use)."""
        key = (num_beams, max(2, 1 + n_eos) * num_beams)
        g = self.groups.get(key)
        if g is None:
            g = self.groups[key] = BeamGroup(self.N, num_beams, n_eos, self.Lc, self.dev, joint=joint)
            self.graphs.clear()
        return g

    # -- requests --------------------------------------------------------------------------------------
    def set_cross(self, dest: torch.Tensor, cross):
        """Packed cross K/V (per layer (K, V) each (T, H, D)) go to arena tokens dest (long (T,))."""
        for (sk, sv), (k, v) in zip(self.cross, cross):
            sk.index_copy_(0, dest, k)
            sv.index_copy_(0, dest, v)

    def join(self, rows: torch.Tensor, prefix: torch.Tensor, cfg: sel.RowConfig, *, enc_start, enc_len, limit: int,
             fill: int, beam=None):
        """Rows `rows` (long (n,)) start sequences holding `prefix` (n, P) tokens, reading the enc_len
        cross-K/V arena tokens from enc_start (ints or (n,) tensors), until they hold `limit` tokens.
        fill: the token beyond the prefix (what transformers' buffers hold there). beam: None, or
        (group, slot, start kwargs) for a beam-search request."""
        P = prefix.shape[1]
        self.seq[rows] = fill
        self.seq[rows, :P] = prefix
        self.t[rows] = P
        self.limit[rows] = limit
        self.stop_t[rows] = 0
        self.nonfinite[rows] = False
        self.alive[rows] = True
        self.busy[rows] = True
        self.busy_rows += rows.shape[0]
        self.cross_start[rows] = enc_start
        self.enc_lens[rows] = enc_len
        self.tables.assign(rows, cfg, prefix)
        self.is_beam[rows] = beam is not None
        if beam is not None:
            group, slot, kw = beam
            group.start(slot, self.seq[rows], prompt=P, max_length=limit, **kw)

    def prefill(self, P: int):
        """Feeds prefix tokens 0 .. P-2 of every row (their K/V go to the cache; no choice is made)."""
        for j in range(P - 1):
            self.decoder.step(self.seq, torch.full_like(self.t, j + 1), self.cache.layers, self.cross, self.cross_start,
                              self.enc_lens, self.enc_bound, self.ops)

    def leave(self, rows: torch.Tensor):
        """Rows stop serving their request (their slots may be reused)."""
        self.busy[rows] = False
        self.busy_rows = max(0, self.busy_rows - rows.shape[0])  # a reset (StateCache) also leaves idle rows
        self.alive[rows] = False
        self.is_beam[rows] = False
        self.t[rows] = 1
        self.cross_start[rows] = 0
        self.enc_lens[rows] = 1
        self.tables.release(rows)

    def reset_clock(self):
        self.steps.zero_()
        self.all_stopped_at.zero_()

    # -- the step ----------------------------------------------------------------------------------------
    def forward(self, extent: tuple[int, int] | None = None, *, processed: bool = True) -> torch.Tensor:
        """The decoder over the rows and the processors: -> scores (n, V) (fp32 when processed; the raw
        logits when nothing is processed). Beam rows get processed log-probs.

        processed: whether anything reads the processed scores (a sampling choice, beam sampling, a caller
        that keeps them); otherwise commit's selection ops (decode/ops.py's select_greedy / select_beam) process the
        logits themselves. extent (eager steps only): (rows, token slots) that hold anything, so that an
        idle tail of rows and slots costs nothing; rows past it score nothing (choose treats them as
        idle). None: every row over the whole buffers, as a captured step runs. (Cross-attention reads
        each row's own span of the arena either way.)"""
        n, L = extent if extent is not None else (self.N, self.Lc)
        t = self.t[:n]  # row r feeds its last token seq[r, t[r] - 1], into cache slot t[r] - 1
        ks, vs = self.cache.layers
        cache = ([k[:n, :L] for k in ks], [v[:n, :L] for v in vs]) if extent is not None else (ks, vs)
        logits = self.decoder.step(self.seq[:n], t, cache, self.cross, self.cross_start[:n], self.enc_lens[:n],
                                   self.enc_bound, self.ops)
        self.logits = logits
        spec = self.spec
        # one pass over the logits: running rows with NaN/inf are flagged (the sampled draws are kept safe), and
        # a greedy step without processors takes its argmax in the same pass (commit uses it)
        fused_greedy = not processed and not spec.needs_scores and self.plain_rows > 0
        self.greedy_tokens = self.dops.scan_logits(logits, self.busy[:n], self.stop_t[:n], self.nonfinite[:n],
                                                  argmax=fused_greedy)
        if not (processed and (spec.needs_scores or self.live_groups)):
            self.scores = logits
            return logits
        scores = logits.float()
        if self.live_groups:
            scores = torch.where(self.is_beam[:n, None], torch.log_softmax(scores, dim=-1), scores)
        self.scores = sel.process(scores, self.seq[:n], t, self.tables, spec)
        return self.scores

    def commit(self, tokens: torch.Tensor | None, *, beam_generator=None, move_length: int | None = None,
               move_caches: bool = True):
        """Writes the chosen tokens (N,) of the non-beam rows (None: greedy), runs the beam groups'
        choice, advances every busy row that has not reached its limit, and updates the finished flags."""
        tab, logits, scores = self.tables, self.logits, self.scores
        n = logits.shape[0]
        if tokens is None:  # greedy for the rows outside beams (none: pad, which nothing reads)
            if self.greedy_tokens is not None:  # taken by forward's pass over the logits (no processors)
                tokens = self.greedy_tokens
            else:
                tokens = self.dops.select_greedy(logits, self.seq[:n], self.t[:n], tab, self.spec) if self.plain_rows \
                    else tab.pad[:n]
        if n < self.N:  # an eager extent: the rows past it are idle
            tokens = torch.cat([tokens, tab.pad[n:]])
            if self.live_groups:  # beam groups read every row
                logits = torch.cat([logits, logits.new_zeros(self.N - n, logits.shape[1])])
                if self.beam_sampling:
                    scores = torch.cat([scores, scores.new_zeros(self.N - n, scores.shape[1])])
        beam_done = self.beam_done
        if self.live_groups or tab.seen is not None:
            room = self.busy & (self.t < self.limit)  # rows that take a token this step
            if tab.seen is not None:  # the repetition penalty's token sets follow the plain rows' choices
                tab.observe(torch.where(self.alive, tokens, tab.pad), room & ~self.is_beam)
        if self.live_groups:  # beam rows: their groups choose, write their tokens and move their caches
            at = self.t.clamp(max=self.Lc - 1)[:, None]
            beam_done = torch.zeros_like(self.busy)
            for g in self.live_groups:
                parents = g.step(logits, self.seq, self.t, tab, self.spec, self.dops, scores=scores,
                                 sample=self.beam_sampling, generator=beam_generator)  # beam_sampling: how many draw
                rows = g.rows.reshape(-1)
                if move_caches:
                    self.cache.move(rows, parents[rows], move_length)
                tab.reorder(rows, parents[rows])
                tab.observe(self.seq.gather(1, at).squeeze(1), self.is_beam & room)
                beam_done[rows] = (g.done & g.active)[:, None].expand_as(g.rows).reshape(-1)  # a beam row stops with its request
        # the rest (pad for finished rows, eos, token writes, progress, stop marks, step counts): one op
        self.dops.commit_tokens(tokens, self.seq, self.t, self.limit, self.alive, self.busy, self.is_beam, beam_done,
                               self.stop_t, tab.pad, tab.eos, self.steps, self.all_stopped_at)

    greedy_tokens = None  # the last forward's argmax tokens when it took them (fused greedy), else None
    beam_sampling = 0  # beam sampling: the leading beam slots that draw their candidates (set by the caller)
    keep_scores = False  # the caller reads the processed scores after each step (output_scores; set by it)

    def step(self, *, choose=None, generator=None, filled: int | None = None, extent=None):
        """One step. choose: None (greedy; with capture, the whole step is one graph replay), or a
        function scores -> tokens run between the decoder and the commit (sampling: the draws stay
        outside graphs, see README; with capture the decoder + processors still replay as a graph).
        generator: beam sampling's RNG. filled: an upper bound on the tokens any row holds (the host
        knows it without a sync): beam caches move only that prefix; a captured step moves it rounded
        up to a multiple of 64 (one graph per such bucket). extent: see forward (eager steps only)."""
        move = filled if filled is not None and self.live_groups else None
        if move is not None and self.static:
            move = min(_round(move, SEQ_BUCKET), self.Lc)
        if not self.capture:
            self.forward(extent, processed=choose is not None or bool(self.beam_sampling) or self.keep_scores)
            self.commit(choose(self.scores) if choose is not None else None, beam_generator=generator,
                        move_length=move)
            return
        whole = choose is None and not self.beam_sampling
        key = (whole, self.plain_rows > 0, self.keep_scores, self.spec,
               tuple(sorted(k for k, g in self.groups.items() if g.n_active)), self.tables.version, move)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key, whole, move)
        graph, self.scores, self.logits, self.greedy_tokens = entry
        graph.replay()
        if not whole:
            self.commit(choose(self.scores) if choose is not None else None, beam_generator=generator,
                        move_length=move)

    def _capture(self, key, whole: bool, move: int | None):
        """Captures forward (+ greedy commit when whole). A warm-up on a side stream comes first
        (Triton compiles there); it runs the step for real, so the small state is saved and restored
        around it, and it does not move beam caches (the K/V it writes are those the next real step
        writes again)."""
        t0 = time.perf_counter()
        saved = self._snapshot()
        s = torch.cuda.Stream(device=self.dev)
        s.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(s):
            for _ in range(2):
                self.forward(processed=not whole or self.keep_scores)
                if whole:
                    self.commit(None, move_caches=False)
                self._restore(saved)
        torch.cuda.current_stream(self.dev).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.forward(processed=not whole or self.keep_scores)
            if whole:
                self.commit(None, move_length=move)
        entry = self.graphs[key] = (graph, self.scores, self.logits, self.greedy_tokens)
        self.captures += 1
        self.capture_seconds += time.perf_counter() - t0
        return entry

    def _snapshot(self):
        bufs = [self.seq, self.t, self.stop_t, self.alive, self.nonfinite, self.steps, self.all_stopped_at]
        if self.tables.seen is not None:
            bufs.append(self.tables.seen)
        for g in self.live_groups:
            bufs += [g.running_scores, g.beam_scores, g.finished, g.open, g.done, g.hyps, g.running_bidx,
                     g.beam_indices]
        return [(b, b.clone()) for b in bufs]

    @staticmethod
    def _restore(saved):
        for b, copy in saved:
            b.copy_(copy)


# ------------------------------------------------------------------------------------------------
# states reused across generate() calls: shapes rounded up to buckets
# ------------------------------------------------------------------------------------------------
SEQ_BUCKET = 64


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round(n: int, m: int) -> int:
    return -(-n // m) * m


def buckets(rows: int, enc_tokens: int, seq_len: int) -> tuple[int, int, int]:
    """Rows to a power of two; packed encoder tokens and token slots to multiples of 64."""
    return _pow2(rows), _round(enc_tokens, SEQ_BUCKET), _round(seq_len, SEQ_BUCKET)


class StateCache:
    """A few decode states per model, keyed by shape bucket (least recently used evicted first): a
    captured step is reused by later generate() calls of nearby shapes."""

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self.entries: dict = {}
        self.created = 0

    @property
    def captures(self) -> int:
        return sum(s.captures for s in self.entries.values())

    @property
    def capture_seconds(self) -> float:
        return sum(s.capture_seconds for s in self.entries.values())

    def get(self, model, rows: int, enc_tokens: int, seq_len: int, capture: bool) -> DecodeState:
        key = (*buckets(rows, enc_tokens, seq_len), model.dtype, model.backend, capture)
        state = self.entries.pop(key, None)
        if state is None:
            while len(self.entries) >= self.max_entries:
                self.entries.pop(next(iter(self.entries)))
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
            N, Tc, Lc = key[:3]
            state = DecodeState(model, N, Lc, 1, Tc, capture=capture)
            self.created += 1
        else:
            state.leave(torch.arange(state.N, device=state.dev))
            for g in state.groups.values():
                g.clear()
            state.reset_clock()
            state.beam_sampling = 0
            state.keep_scores = False
        self.entries[key] = state
        return state
