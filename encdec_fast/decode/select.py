"""Token selection on the device: logits processors, greedy and sampled choice, for every decode row.

transformers applies its logits processors to `input_ids` of a growing length; a captured decode step
needs fixed shapes. So every processor here reads the fixed token buffer `seq (N, Lc)` with the
per-row token count `t (N,)`, and per-row settings held in device tables (`RowTables`): one step
serves rows of different requests, each with its own settings, and never syncs with the host. The
results equal transformers' processors on `seq[n, :t[n]]` element for element (same fp32 ops, same
order), which the tests check against transformers' own classes.

Order, as GenerationMixin._get_logits_processor (5.x) appends them:
    repetition penalty -> no-repeat n-gram -> bad words -> min length / min new tokens -> forced eos
    -> (sampling) temperature -> top-k -> top-p
The masks (n-gram, bad words, min length) commute with each other; the repetition penalty runs first.

Per-row state that grows with the sequence (`seen`, the tokens a row holds, for the repetition
penalty) is updated in place by `RowTables.observe` when a token is chosen.

`Spec` says which processors a step runs at all (the union over its rows; a row whose setting is
neutral passes through unchanged, bit for bit): it is part of a captured step's key.

The settings are checked once, when generate() or Engine.submit() resolves them
(validate.generation_values / validate.generation); nothing here raises.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------------
# settings: per request on the host (RowConfig), per row on the device (RowTables)
# ------------------------------------------------------------------------------------------------
@dataclass
class RowConfig:
    """One request's selection settings, resolved from its GenerationConfig."""

    eos: list[int] | None
    pad: int
    do_sample: bool = False
    penalty: float = 1.0
    ngram: int = 0
    bad_single: list[int] = field(default_factory=list)
    bad_multi: list[tuple[int, ...]] = field(default_factory=list)
    min_len: int = 0  # eos is banned while a row holds fewer tokens (decoder start included)
    forced_eos: list[int] = field(default_factory=list)  # forced when a row holds forced_at tokens (BART)
    forced_at: int = -1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_keep: int = 1  # top-k / top-p keep at least this many tokens

    @classmethod
    def from_generation_config(cls, gc, *, prompt_len: int, eos: list[int] | None, pad: int | None,
                               vocab_size: int) -> "RowConfig":
        """The settings transformers' processors would get for this resolved GenerationConfig (lengths
        already prepared: gc.min_length includes the prompt when min_new_tokens is set)."""
        c = cls(eos=eos, pad=pad if pad is not None else 0, do_sample=bool(gc.do_sample))
        if gc.repetition_penalty is not None and gc.repetition_penalty != 1.0:
            c.penalty = float(gc.repetition_penalty)
        if gc.no_repeat_ngram_size is not None and gc.no_repeat_ngram_size > 0:
            c.ngram = gc.no_repeat_ngram_size
        if gc.bad_words_ids is not None:
            c.bad_single, c.bad_multi = _bad_words(gc.bad_words_ids, eos, vocab_size)
        if eos is not None:
            if gc.min_length is not None and gc.min_length > 0:
                c.min_len = gc.min_length
            if gc.min_new_tokens is not None and gc.min_new_tokens > 0:
                c.min_len = max(c.min_len, prompt_len + gc.min_new_tokens)
        if gc.forced_eos_token_id is not None:  # the last token of a max_length sequence is eos (BART)
            forced = gc.forced_eos_token_id
            forced = [forced] if isinstance(forced, int) else list(forced)  # in the vocabulary: validate.generation
            c.forced_eos, c.forced_at = forced, gc.max_length - 1
        if c.do_sample:
            # beams keep one non-eos token beyond the eos ids, so a continuation always survives
            c.min_keep = (len(eos) + 1 if eos is not None else 2) if (gc.num_beams or 1) > 1 else 1
            if gc.temperature is not None and gc.temperature != 1.0:
                c.temperature = float(gc.temperature)
            if gc.top_k is not None and gc.top_k != 0:
                c.top_k = max(gc.top_k, c.min_keep)
            if gc.top_p is not None and gc.top_p < 1.0:
                c.top_p = float(gc.top_p)
        return c

    def key(self) -> tuple:
        """Hashable: requests with equal keys select identically."""
        return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in vars(self).items())


def _bad_words(bad_words_ids, eos: list[int] | None, vocab_size: int):
    """-> (single-token bans, multi-token sequences), as NoBadWordsLogitsProcessor reads them: single
    tokens equal to an eos id are dropped, duplicates removed."""
    words = []
    for w in bad_words_ids:
        w = [int(i) for i in w]
        if eos is not None and len(w) == 1 and w[0] in eos:
            continue
        words.append(tuple(w))
    words = list(dict.fromkeys(words))
    return [w[0] for w in words if len(w) == 1], [w for w in words if len(w) > 1]


@dataclass(frozen=True)
class Spec:
    """Which processors a step runs (the union over its rows); part of a captured step's key."""

    penalty: bool = False
    ngram_sizes: tuple[int, ...] = ()
    bad_single: bool = False
    bad_multi: bool = False
    min_len: bool = False
    forced_eos: bool = False
    temperature: bool = False
    top_k: bool = False
    top_p: bool = False
    sample: bool = False

    @classmethod
    def of(cls, configs) -> "Spec":
        configs = list(configs)
        return cls(
            penalty=any(c.penalty != 1.0 for c in configs),
            ngram_sizes=tuple(sorted({c.ngram for c in configs if c.ngram > 0})),
            bad_single=any(c.bad_single for c in configs),
            bad_multi=any(c.bad_multi for c in configs),
            min_len=any(c.min_len > 0 for c in configs),
            forced_eos=any(c.forced_at >= 0 for c in configs),
            temperature=any(c.do_sample and c.temperature != 1.0 for c in configs),
            top_k=any(c.do_sample and c.top_k > 0 for c in configs),
            top_p=any(c.do_sample and c.top_p < 1.0 for c in configs),
            sample=any(c.do_sample for c in configs),
        )

    def split(self) -> tuple[Spec, Spec]:
        """(the processors, the sampling warpers): the two parts of process() between which transformers
        runs the logits processors a caller passes to generate() (temperature, top-k and top-p come after)."""
        warpers = dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return (dataclasses.replace(self, temperature=False, top_k=False, top_p=False),
                Spec(**warpers, sample=self.sample))

    @property
    def needs_scores(self) -> bool:
        """Whether the logits go through any processor (else greedy takes argmax of the raw logits)."""
        return any((self.penalty, self.ngram_sizes, self.bad_single, self.bad_multi, self.min_len, self.forced_eos,
                    self.temperature, self.top_k, self.top_p, self.sample))


class RowTables:
    """Per-row selection settings and state on the device, for `rows` decode rows. Addresses never
    change after growth, so a captured step keeps reading them; `assign` writes a request's rows.

    seen (N, V) bool: tokens a row holds (repetition penalty); ban (N, V) bool: single-token bad words;
    eos (N, E) long padded with -1; bad-word sequences (G, P) with owner (N, G)."""

    def __init__(self, rows: int, vocab: int, device):
        self.N, self.V, self.dev = rows, vocab, device
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.long, device=device)
        self.penalty = torch.ones(rows, **f32)
        self.ngram = torch.zeros(rows, **i64)
        self.min_len = torch.zeros(rows, **i64)
        self.pad = torch.zeros(rows, **i64)
        self.temperature = torch.ones(rows, **f32)
        self.top_k = torch.full((rows,), vocab, **i64)
        self.one_minus_p = torch.zeros(rows, **f32)  # 1 - top_p, rounded as transformers rounds it
        self.min_keep = torch.ones(rows, **i64)
        self.do_sample = torch.zeros(rows, dtype=torch.bool, device=device)
        self.eos = torch.full((rows, 1), -1, **i64)
        self.forced_at = torch.full((rows,), -1, **i64)  # token count at which eos is forced (-1: never)
        self.forced = torch.full((rows, 1), -1, **i64)  # the forced eos ids, padded with -1
        self.seen = self.ban = None  # (N, V) bool, allocated on first use
        self.bad_prefix = torch.full((0, 1), -1, **i64)  # (G, P) prefixes, left-aligned, -1 padded
        self.bad_plen = torch.zeros(0, **i64)
        self.bad_last = torch.zeros(0, **i64)
        self.bad_owner = torch.zeros(rows, 0, dtype=torch.bool, device=device)
        self.version = 0  # bumped when a table is (re)allocated: captured steps must be redone

    # -- writing rows -------------------------------------------------------------------------------
    def assign(self, rows: torch.Tensor, cfg: RowConfig, prefix: torch.Tensor):
        """Rows `rows` (long, on the device) serve a request with settings cfg, holding tokens `prefix`
        (len(rows), P) so far."""
        self.penalty[rows] = cfg.penalty
        self.ngram[rows] = cfg.ngram
        self.min_len[rows] = cfg.min_len
        self.pad[rows] = cfg.pad
        self.temperature[rows] = cfg.temperature
        self.top_k[rows] = cfg.top_k if cfg.top_k > 0 else self.V
        self.one_minus_p[rows] = torch.tensor(1 - cfg.top_p, dtype=torch.float32)  # the double, rounded once
        self.min_keep[rows] = cfg.min_keep
        self.do_sample[rows] = cfg.do_sample
        self.eos = self._put(self.eos, rows, cfg.eos or [])
        self.forced_at[rows] = cfg.forced_at
        self.forced = self._put(self.forced, rows, cfg.forced_eos)
        if cfg.penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(self.N, self.V, dtype=torch.bool, device=self.dev)
                self.version += 1
            self.seen[rows] = False
            self.seen[rows[:, None].expand_as(prefix), prefix] = True
        if self.ban is not None or cfg.bad_single:
            if self.ban is None:
                self.ban = torch.zeros(self.N, self.V, dtype=torch.bool, device=self.dev)
                self.version += 1
            self.ban[rows] = False
            if cfg.bad_single:
                self.ban[rows[:, None], torch.tensor(cfg.bad_single, device=self.dev)[None, :]] = True
        if self.bad_owner.shape[1]:
            self.bad_owner[rows] = False
        if cfg.bad_multi:
            self._add_bad_multi(rows, cfg.bad_multi)

    def _put(self, table: torch.Tensor, rows: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """Rows of an (N, E) id table padded with -1 take `ids` (the table widens if needed)."""
        if len(ids) > table.shape[1]:
            table = torch.cat([table, table.new_full((self.N, len(ids) - table.shape[1]), -1)], 1)
            self.version += 1
        table[rows] = -1
        if ids:
            table[rows, :len(ids)] = torch.tensor(ids, dtype=torch.long, device=self.dev)
        return table

    def _add_bad_multi(self, rows, words):
        """Appends the request's multi-token bad words (rows may share a word with other requests); past
        64 sequences, those of requests that left are dropped first (a long-running engine stays bounded)."""
        if self.bad_prefix.shape[0] >= 64:
            self.compact()
        G0, P0 = self.bad_prefix.shape
        P = max(P0, max(len(w) - 1 for w in words))
        prefix = torch.full((G0 + len(words), P), -1, dtype=torch.long, device=self.dev)
        prefix[:G0, :P0] = self.bad_prefix
        for g, w in enumerate(words):
            prefix[G0 + g, :len(w) - 1] = torch.tensor(w[:-1], device=self.dev)
        owner = torch.zeros(self.N, G0 + len(words), dtype=torch.bool, device=self.dev)
        owner[:, :G0] = self.bad_owner
        owner[rows[:, None], torch.arange(G0, G0 + len(words), device=self.dev)[None, :]] = True
        self.bad_prefix, self.bad_owner = prefix, owner
        self.bad_plen = torch.cat([self.bad_plen, torch.tensor([len(w) - 1 for w in words], device=self.dev)])
        self.bad_last = torch.cat([self.bad_last, torch.tensor([w[-1] for w in words], device=self.dev)])
        self.version += 1

    def release(self, rows: torch.Tensor):
        """Rows that left their request own no bad-word sequence any more."""
        if self.bad_owner.shape[1]:
            self.bad_owner[rows] = False

    def compact(self):
        """Drops multi-token bad words no row uses any more (between steps; changes the tables)."""
        used = self.bad_owner.any(0)
        if self.bad_owner.shape[1] and not bool(used.all()):
            self.bad_prefix, self.bad_owner = self.bad_prefix[used], self.bad_owner[:, used].contiguous()
            self.bad_plen, self.bad_last = self.bad_plen[used], self.bad_last[used]
            self.version += 1

    # -- state that follows the tokens ---------------------------------------------------------------
    def observe(self, tokens: torch.Tensor, rows: torch.Tensor):
        """Row n now also holds tokens[n], where rows[n] (bool) (repetition penalty)."""
        if self.seen is not None:
            idx = tokens[:, None]
            self.seen.scatter_(1, idx, self.seen.gather(1, idx) | rows[:, None])

    def reorder(self, rows: torch.Tensor, parents: torch.Tensor):
        """Beam search: row rows[i] continues row parents[i] (its seen-set follows)."""
        if self.seen is not None:
            self.seen[rows] = self.seen[parents]


# ------------------------------------------------------------------------------------------------
# processors over the fixed token buffer
# ------------------------------------------------------------------------------------------------
def process(scores: torch.Tensor, seq: torch.Tensor, t: torch.Tensor, tab: RowTables, spec: Spec) -> torch.Tensor:
    """The processors of `spec` on fp32 scores (N, V) of rows holding tokens seq[n, :t[n]]."""
    N, V = scores.shape
    if spec.penalty:
        pen = tab.penalty[:N, None]
        penalised = torch.where(scores < 0, scores * pen, scores / pen)
        scores = torch.where(tab.seen[:N], penalised, scores)
    banned = None
    for n in spec.ngram_sizes:
        hit = _ngram_bans(seq[:N], t, n, tab.ngram[:N] == n, V)
        banned = hit if banned is None else banned | hit
    if spec.bad_multi and tab.bad_prefix.shape[0]:
        hit = _bad_multi_bans(seq[:N], t, tab, V)
        banned = hit if banned is None else banned | hit
    if banned is not None:
        scores = scores.masked_fill(banned, NEG_INF)
    if spec.bad_single:
        scores = scores.masked_fill(tab.ban[:N], NEG_INF)
    if spec.min_len:
        short = t < tab.min_len[:N]  # (N,)
        eos_col = _eos_columns(tab.eos[:N], V)  # (N, V)
        scores = scores.masked_fill(eos_col & short[:, None], NEG_INF)
    if spec.forced_eos:  # rows at max_length - 1 tokens: eos ids 0, every other token -inf
        last = (t == tab.forced_at[:N])[:, None]
        forced = torch.where(_eos_columns(tab.forced[:N], V), 0.0, NEG_INF).to(scores.dtype)
        scores = torch.where(last, forced, scores)
    if spec.temperature:
        scores = scores / tab.temperature[:N, None]
    if spec.top_k:
        k = torch.minimum(tab.top_k[:N], torch.full_like(tab.top_k[:N], V))
        kth = torch.sort(scores, dim=-1, descending=True)[0].gather(1, (k - 1)[:, None])
        scores = scores.masked_fill(scores < kth, NEG_INF)
    if spec.top_p:
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= tab.one_minus_p[:N, None]
        drop &= torch.arange(V, device=scores.device)[None, :] < (V - tab.min_keep[:N, None])
        scores = scores.masked_fill(drop.scatter(1, order, drop), NEG_INF)
    return scores


def _eos_columns(eos: torch.Tensor, V: int) -> torch.Tensor:
    """(N, E) eos ids padded with -1 -> (N, V) bool: column is one of the row's eos ids."""
    cols = torch.zeros(eos.shape[0], V + 1, dtype=torch.bool, device=eos.device)
    cols.scatter_(1, torch.where(eos >= 0, eos, V), True)
    return cols[:, :V]


def _ngram_bans(seq, t, n: int, rows_n, V: int) -> torch.Tensor:
    """Rows in rows_n: ban every token that would complete an n-gram already in seq[:, :t]."""
    N, Lc = seq.shape
    if Lc < n:
        return torch.zeros(N, V, dtype=torch.bool, device=seq.device)
    idx = (t[:, None] - n + 1 + torch.arange(n - 1, device=seq.device)[None, :]).clamp(min=0)  # (N, n-1)
    prefix = seq.gather(1, idx)  # the last n-1 tokens
    windows = seq.unfold(1, n, 1)  # (N, Lc-n+1, n)
    inside = torch.arange(Lc - n + 1, device=seq.device)[None, :] + n <= t[:, None]  # window within seq[:, :t]
    matches = (windows[..., :-1] == prefix[:, None, :]).all(-1) & inside & rows_n[:, None]
    banned = torch.zeros(N, V + 1, dtype=torch.bool, device=seq.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1], V), True)  # non-matches land in column V
    return banned[:, :V]


def _bad_multi_bans(seq, t, tab: RowTables, V: int) -> torch.Tensor:
    """Ban the last token of a bad sequence whose prefix ends seq[:, :t] (skipped while the prefix is
    longer than t, as transformers skips it)."""
    N = seq.shape[0]
    G, P = tab.bad_prefix.shape
    j = torch.arange(P, device=seq.device)
    plen = tab.bad_plen  # (G,)
    pos = t[:, None, None] - plen[None, :, None] + j[None, None, :]  # (N, G, P)
    tail = seq.gather(1, pos.clamp(min=0, max=seq.shape[1] - 1).view(N, G * P)).view(N, G, P)
    same = (tail == tab.bad_prefix[None]) | (j[None, None, :] >= plen[None, :, None])
    hit = same.all(-1) & (plen[None, :] <= t[:, None]) & tab.bad_owner[:N]  # (N, G)
    banned = torch.zeros(N, V + 1, dtype=torch.bool, device=seq.device)
    banned.scatter_(1, torch.where(hit, tab.bad_last[None, :].expand(N, G), V), True)
    return banned[:, :V]


# ------------------------------------------------------------------------------------------------
# choice
# ------------------------------------------------------------------------------------------------
def greedy(scores: torch.Tensor) -> torch.Tensor:
    """argmax per row (ties: the first index, as torch.argmax)."""
    return torch.argmax(scores, dim=-1)


def sampling_probs(scores: torch.Tensor) -> torch.Tensor:
    """softmax(scores) for torch.multinomial, the NaN of a non-finite row replaced: on CUDA a NaN
    probability is a device-side assert that kills the process. Identity on finite rows; the row's
    request still fails, through DecodeState.nonfinite (decode/ops.py's nonfinite_rows)."""
    return torch.softmax(scores, dim=-1).nan_to_num_(nan=1.0)


def sample(scores: torch.Tensor, generator=None) -> torch.Tensor:
    """One draw per row from softmax(scores), as transformers draws it (torch.multinomial)."""
    return torch.multinomial(sampling_probs(scores), num_samples=1, generator=generator).squeeze(1)


def is_eos(tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """tokens (N,) against each row's eos ids (N, E) padded with -1 -> (N,) bool."""
    return (tokens[:, None] == eos[:tokens.shape[0]]).any(-1)
