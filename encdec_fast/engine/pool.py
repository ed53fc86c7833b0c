"""Continuous batching for the engine: a pool of decode slots that requests join and leave between steps.

State, all preallocated and grown (never shrunk) to the longest request seen so far:

  seq       (N, Lcap) long                  each slot's decoder tokens (decoder start + generated)
  self_kv   (2, layers, N, Lcap, H, D)      self-attention cache, one row per slot
  cross_kv  (2, layers, N, Scap, H, D)      cross-attention K/V pool: a request's encoder output, projected
                                            once, sits in the row of its first slot; its other slots (several
                                            returned sequences) point at it through kv_index
  alive     (N,) bool, pad (N,) long        rows still generating; finished rows of a request with
                                            several sequences emit pad, as decode/search.py does

Per slot (host lists, one small upload per step): pos = tokens already in the slot's cache (the cache
slot written this step), kv_index = its pool row, enc_len = the pool row's valid encoder positions.

A step runs Decoder.step on slots [0, hi) (hi = highest busy slot + 1; free slots in that range feed a
harmless dummy token into their own cache row), over cache and pool views cut to the longest busy
row (kv_index is left out when every slot reads its own pool row: no gather of the pool). Then each
request's logits processors run exactly as decode/search.py's _sample runs them: rows are grouped by
(processor pipeline, do_sample, length), so a group's ids (G, t) are exactly what a solo run passes;
greedy rows take one argmax, sampling rows draw with their request's own torch.Generator (so a
request with seed=s reproduces `torch.manual_seed(s); model.generate(...)`). Finished requests leave
at once and their slots are refilled before the next step.
"""

from __future__ import annotations

import heapq

import torch
import torch.nn.functional as F

from ..decode import select as procs_mod

_GROW = 64  # capacities grow in multiples of this many positions


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def length_chunks(items: list, length, max_tokens: int, max_rows: int, rows=lambda r: 1,
                  max_padding: float = 0.25) -> list[list]:
    """Sorts items by length and cuts them into runs whose padded size (rows x longest) stays within
    max_tokens, whose rows stay within max_rows, and whose padding stays within max_padding of their
    real tokens; an item too big on its own goes alone."""
    out, cur, cur_rows, cur_real = [], [], 0, 0
    for it in sorted(items, key=length):
        n, ln = rows(it), length(it)  # ln is the longest so far: items come shortest first
        padded = (cur_rows + n) * ln
        if cur and (padded > max_tokens or cur_rows + n > max_rows or padded > (1 + max_padding) * (cur_real + n * ln)):
            out.append(cur)
            cur, cur_rows, cur_real = [], 0, 0
        cur.append(it)
        cur_rows, cur_real = cur_rows + n, cur_real + n * ln
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
    """A request in the pool: its slots (one per returned sequence), pool row and progress."""

    __slots__ = ("req", "slots", "slots_t", "row", "t", "alive", "pipeline", "needs_ids", "generator")

    def __init__(self, req, slots: list[int], row: int, pipeline, needs_ids: bool, generator, device):
        self.req, self.slots, self.row = req, slots, row
        self.slots_t = torch.tensor(slots, dtype=torch.long, device=device)
        self.t = 1  # tokens in each row: the decoder start
        self.alive = [True] * len(slots)
        self.pipeline, self.needs_ids, self.generator = pipeline, needs_ids, generator


# processors that read only the scores: rows of any length can share one call
_IDS_FREE = {"Temperature", "TopK", "TopP"}


class DecodePool:
    def __init__(self, model, slots: int, max_batch_tokens: int, on_tokens=None):
        """on_tokens(req, new_rows): gets a streamed request's new tokens (one list per slot) whenever
        they reach the host; a request whose req.cancelled is set leaves at the next host check."""
        self.model, self.N, self.max_batch_tokens = model, slots, max_batch_tokens
        self.on_tokens = on_tokens
        dcfg = model.cfg.decoder
        self.layers, self.H, self.D = dcfg.num_layers, dcfg.num_heads, dcfg.head_dim
        self.enc_pad = model.cfg.encoder.pad_token_id or 0
        self.dev, self.dtype = model.device, model.dtype
        self.Lcap = self.Scap = 0
        self.seq = torch.zeros(slots, 0, dtype=torch.long, device=self.dev)
        self.self_kv = self.cross_kv = None
        self.alive = torch.ones(slots, dtype=torch.bool, device=self.dev)
        self.pad = torch.zeros(slots, dtype=torch.long, device=self.dev)
        self.pos, self.kv_index, self.enc_len = [0] * slots, list(range(slots)), [1] * slots
        self.free_slots = list(range(slots))
        self.lives: list[Live] = []
        self.pipelines: dict = {}  # pipeline key -> (device pipeline, needs_ids)
        self.steps = self.rows_stepped = 0
        # CUDA: the decode step over all N slots is captured as a graph per pool capacity (decode/state.py
        # explains why); idle slots ride along at position 0 of their own rows, which is harmless
        self.use_graph = self.dev.type == "cuda" and getattr(model, "cuda_graphs", False)
        self._graph = None
        self.graph_captures = 0

    # -- capacity ------------------------------------------------------------------------------
    @property
    def free(self) -> int:
        return len(self.free_slots)

    def _grow(self, L: int, S: int):
        """Capacity for L decoder tokens per slot and S encoder positions per pool row (content kept)."""
        z = dict(dtype=self.dtype, device=self.dev)
        if L > self.Lcap:
            Lc = _round_up(L, _GROW)
            seq = torch.zeros(self.N, Lc, dtype=torch.long, device=self.dev)
            kv = torch.zeros(2, self.layers, self.N, Lc, self.H, self.D, **z)
            if self.Lcap:
                seq[:, :self.Lcap] = self.seq
                kv[:, :, :, :self.Lcap] = self.self_kv
            self.seq, self.self_kv, self.Lcap = seq, kv, Lc
            self._graph = None  # it points at the old buffers
        if S > self.Scap:
            Sc = _round_up(S, _GROW)
            kv = torch.zeros(2, self.layers, self.N, Sc, self.H, self.D, **z)
            if self.Scap:
                kv[:, :, :, :self.Scap] = self.cross_kv
            self.cross_kv, self.Scap = kv, Sc
            self._graph = None

    # -- joining ---------------------------------------------------------------------------------
    def _pipeline(self, req):
        got = self.pipelines.get(req.proc_key)
        if got is None:
            pipe = procs_mod.build(req.gc, prompt_len=1, eos=req.eos, vocab_size=self.model.cfg.decoder.vocab_size,
                                   device=self.dev)
            got = (pipe, any(type(s).__name__ not in _IDS_FREE for s in pipe.steps))
            self.pipelines[req.proc_key] = got
        return got

    def admit(self, reqs: list) -> list:
        """Encodes reqs (their rows must fit in the free slots) in micro-batches of similar source
        length, writes their cross K/V into pool rows and gives them slots. Returns [(req, exc)] for
        the requests that failed (a failing micro-batch fails only its own requests)."""
        failed = []
        chunks = length_chunks(reqs, lambda r: len(r.ids), self.max_batch_tokens, self.N)
        for chunk in chunks:
            try:
                self._join(chunk)
            except Exception as e:  # noqa: BLE001  (reported on the requests' futures)
                failed += [(r, e) for r in chunk]
        return failed

    def _join(self, chunk: list):
        g, ops = self.model.net, self.model.ops
        ids, mask = pad_batch([r.ids for r in chunk], self.enc_pad, self.dev)
        S = ids.shape[1]
        enc, _ = self.model.encode(ids, mask)
        cross = g.decoder.cross_kv(g.project(enc, ops), ops)  # per layer (K, V) each (B, S, H, D)
        pipes = [self._pipeline(r) for r in chunk]
        gens = []
        for r in chunk:
            gen = None
            if r.gc.do_sample:
                gen = torch.Generator(device=self.dev)
                gen.manual_seed(r.seed)
            gens.append(gen)
        self._grow(max(r.max_length for r in chunk), S)
        slots = [[heapq.heappop(self.free_slots) for _ in range(r.rows)] for r in chunk]
        rows_t = torch.tensor([sl[0] for sl in slots], dtype=torch.long, device=self.dev)
        for i, (k, v) in enumerate(cross):
            self.cross_kv[0, i][rows_t, :S] = k
            self.cross_kv[1, i][rows_t, :S] = v
        for r, sl, (pipe, needs_ids), gen in zip(chunk, slots, pipes, gens):
            for s in sl:
                self.pos[s], self.kv_index[s], self.enc_len[s] = 0, sl[0], len(r.ids)
            live = Live(r, sl, sl[0], pipe, needs_ids, gen, self.dev)
            self.seq[live.slots_t, 0] = r.start
            self.pad[live.slots_t] = r.pad if r.pad is not None else 0
            self.lives.append(live)

    # -- one step ------------------------------------------------------------------------------
    def _full_step(self):
        """decoder.step over every slot, reading the static meta rows (pos, kv_index, enc_len)."""
        pos, kv_index, enc_lens = self.g_meta[0], self.g_meta[1], self.g_meta[2].to(torch.int32)
        ids = self.seq.gather(1, pos[:, None]).squeeze(1)  # (N,) the last token of each slot
        kv, L = self.self_kv, self.layers
        cache = ([kv[0, i] for i in range(L)], [kv[1, i] for i in range(L)])
        cross = [(self.cross_kv[0, i], self.cross_kv[1, i]) for i in range(L)]
        return self.model.net.decoder.step(ids, pos, cache, cross, None, kv_index, enc_lens, self.model.ops)

    def _graphed_logits(self, hi: int):
        meta = torch.tensor([self.pos, self.kv_index, self.enc_len], dtype=torch.long)
        if self._graph is None:
            self.g_meta = meta.to(self.dev)
            s = torch.cuda.Stream(device=self.dev)
            s.wait_stream(torch.cuda.current_stream(self.dev))
            with torch.cuda.stream(s):  # warm-up (Triton compiles); rewrites the same K/V the step writes
                for _ in range(2):
                    self._full_step()
            torch.cuda.current_stream(self.dev).wait_stream(s)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self.g_out = self._full_step()
            self.graph_captures += 1
        else:
            self.g_meta.copy_(meta)
        self._graph.replay()
        return self.g_out[:hi]

    def step(self) -> list:
        """One token for every busy row. Returns [(request, rows as lists of ids)] for the requests that
        finished."""
        lives = self.lives
        hi = max(s for lv in lives for s in lv.slots) + 1
        tmax = max(lv.t for lv in lives)
        smax = max(len(lv.req.ids) for lv in lives)
        meta = torch.tensor([self.pos[:hi], self.kv_index[:hi], self.enc_len[:hi]], dtype=torch.long).to(self.dev)
        pos = meta[0]
        if self.use_graph:
            logits = self._graphed_logits(hi)
        else:
            kv_index, enc_lens = meta[1], meta[2].to(torch.int32)
            ids = self.seq[:hi].gather(1, pos[:, None]).squeeze(1)  # (hi,) the last token of each row
            kv = self.self_kv
            cache = ([kv[0, i, :hi, :tmax] for i in range(self.layers)],
                     [kv[1, i, :hi, :tmax] for i in range(self.layers)])
            own = all(self.kv_index[s] == s for lv in lives for s in lv.slots)
            rows = slice(0, hi) if own else slice(None)
            cross = [(self.cross_kv[0, i, rows, :smax], self.cross_kv[1, i, rows, :smax]) for i in range(self.layers)]
            logits = self.model.net.decoder.step(ids, pos, cache, cross, None, None if own else kv_index, enc_lens,
                                                   self.model.ops)
        scores = logits.to(torch.float32, copy=True)  # (hi, V)

        tok = torch.zeros(hi, dtype=torch.long, device=self.dev)
        groups: dict = {}
        for lv in lives:
            key = (lv.req.proc_key, lv.req.gc.do_sample, lv.t if (lv.needs_ids and len(lv.pipeline)) else 0)
            groups.setdefault(key, []).append(lv)
        for (_, sample, t), members in groups.items():
            idx = members[0].slots_t if len(members) == 1 else torch.cat([lv.slots_t for lv in members])
            sc = scores[idx]
            pipe = members[0].pipeline
            if len(pipe):
                sc = pipe(self.seq[idx, :max(t, 1)], sc)
            if sample:
                probs = F.softmax(sc, dim=-1)
                off = 0
                for lv in members:
                    n = len(lv.slots)
                    draw = torch.multinomial(probs[off:off + n], num_samples=1, generator=lv.generator)
                    tok[lv.slots_t] = draw.squeeze(1)
                    off += n
            else:
                tok[idx] = torch.argmax(sc, dim=-1)
        tok = torch.where(self.alive[:hi], tok, self.pad[:hi])
        self.seq[torch.arange(hi, device=self.dev), pos + 1] = tok
        toks = tok.tolist()  # the one host sync per step
        self.steps += 1
        self.rows_stepped += sum(len(lv.slots) for lv in lives)

        done, newly_dead, keep, dropped = [], [], [], []
        for lv in lives:
            lv.t += 1
            for s in lv.slots:
                self.pos[s] += 1
            if lv.req.cancelled:  # its stream was closed or its future cancelled: free the slots now
                dropped.append(lv)
                continue
            if lv.req.stream is not None:
                self.on_tokens(lv.req, [[toks[s]] for s in lv.slots])
            eos = lv.req.eos_set
            if eos:
                for j, s in enumerate(lv.slots):
                    if lv.alive[j] and toks[s] in eos:
                        lv.alive[j] = False
                        newly_dead.append(s)
            if not any(lv.alive) or lv.t >= lv.req.max_length:
                done.append(lv)
            else:
                keep.append(lv)
        if newly_dead:
            self.alive[torch.tensor(newly_dead, dtype=torch.long, device=self.dev)] = False
        self.lives = keep
        out = [(lv.req, self.seq[lv.slots_t, :lv.t].tolist()) for lv in done]
        for lv in done + dropped:
            self._release(lv)
        return out

    def _release(self, lv: Live):
        self.alive[lv.slots_t] = True
        for s in lv.slots:
            self.pos[s], self.kv_index[s], self.enc_len[s] = 0, s, 1
            heapq.heappush(self.free_slots, s)

    def clear(self) -> list:
        """Drops every request in the pool (after a failed step, or at shutdown); returns them."""
        reqs = [lv.req for lv in self.lives]
        for lv in self.lives:
            self._release(lv)
        self.lives = []
        return reqs
