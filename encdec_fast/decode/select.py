"""Logits processors: the score transforms applied at each decode step, as transformers applies them.

Each processor is a callable (ids (N, t) long, scores (N, V) float32) -> scores (N, V); none
modifies its input in place, none syncs with the host, none loops over rows in Python. build()
returns them in the order transformers' GenerationMixin._get_logits_processor (5.x) appends them:

    repetition penalty -> no-repeat n-gram -> bad words -> min length -> min new tokens -> forced eos
    -> (sampling only) temperature -> top-k -> top-p

The semantics are those of transformers.generation.logits_process (RepetitionPenaltyLogitsProcessor,
NoRepeatNGramLogitsProcessor, NoBadWordsLogitsProcessor, MinLengthLogitsProcessor,
MinNewTokensLengthLogitsProcessor, ForcedEOSTokenLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
TopPLogitsWarper); the tests compare every processor against its transformers class on the same inputs.
"""

from __future__ import annotations

import torch

from ..errors import InvalidInputError

NEG_INF = float("-inf")


class RepetitionPenalty:
    """Every token already in the sequence: score * penalty if score < 0, else score / penalty."""

    def __init__(self, penalty: float):
        if not penalty > 0:
            raise InvalidInputError(f"repetition_penalty must be a positive float, got {penalty!r}; 1.0 means no penalty.")
        self.penalty = float(penalty)

    def __call__(self, ids, scores):
        seen = torch.gather(scores, 1, ids)  # (N, t)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return scores.scatter(1, ids, seen)


class NoRepeatNGram:
    """Bans every token that would complete an n-gram already present in the sequence.

    Vectorised over rows: the last n-1 tokens are compared against every window of the sequence at
    once; a matching window bans its last token."""

    def __init__(self, n: int):
        if not isinstance(n, int) or n <= 0:
            raise InvalidInputError(f"no_repeat_ngram_size must be a positive integer, got {n!r}.")
        self.n = n

    def __call__(self, ids, scores):
        N, t = ids.shape
        n, V = self.n, scores.shape[-1]
        if t < n:
            return scores
        prefix = ids[:, t + 1 - n:]  # (N, n-1)
        windows = ids.unfold(1, n, 1)  # (N, t-n+1, n)
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)  # (N, t-n+1)
        banned = torch.zeros(N, V + 1, dtype=torch.bool, device=scores.device)
        banned.scatter_(1, torch.where(matches, windows[..., -1], V), True)  # non-matches land in column V
        return scores.masked_fill(banned[:, :V], NEG_INF)


class BadWords:
    """Bans single tokens always, and the last token of a longer bad sequence when its prefix ends the
    sequence. Single-token bad words equal to an eos id are dropped, as transformers does."""

    def __init__(self, bad_words_ids, eos: list[int] | None, vocab_size: int, device):
        if not isinstance(bad_words_ids, (list, tuple)) or len(bad_words_ids) == 0 or any(
                not isinstance(w, (list, tuple)) or len(w) == 0 for w in bad_words_ids):
            raise InvalidInputError(f"bad_words_ids must be a non-empty list of non-empty lists of token ids, got {bad_words_ids!r}.")
        words = []
        for w in bad_words_ids:
            w = [int(i) for i in w]
            if any(i < 0 or i >= vocab_size for i in w):
                raise InvalidInputError(f"bad_words_ids holds {w}, outside the vocabulary [0, {vocab_size}).")
            if eos is not None and len(w) == 1 and w[0] in eos:
                continue
            words.append(tuple(w))
        words = list(dict.fromkeys(words))
        self.single = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.single[[w[0] for w in words if len(w) == 1]] = True
        by_len: dict[int, list[tuple[int, ...]]] = {}
        for w in words:
            if len(w) > 1:
                by_len.setdefault(len(w) - 1, []).append(w)
        # per prefix length: (prefixes (G, L), last tokens (G,))
        self.multi = [(torch.tensor([w[:-1] for w in g], device=device), torch.tensor([w[-1] for w in g], device=device))
                      for g in by_len.values()]

    def __call__(self, ids, scores):
        N, V = scores.shape
        banned = self.single.expand(N, V)
        if self.multi:
            extra = torch.zeros(N, V + 1, dtype=torch.bool, device=scores.device)
            for prefixes, last in self.multi:
                L = prefixes.shape[1]
                if L > ids.shape[1]:
                    continue
                hit = (ids[:, None, -L:] == prefixes).all(dim=-1)  # (N, G)
                extra.scatter_(1, torch.where(hit, last, V), True)
            banned = banned | extra[:, :V]
        return scores.masked_fill(banned, NEG_INF)


class MinLength:
    """eos scores -> -inf while the sequence (decoder start and prefix included) is shorter than `length`.
    Serves min_length (length = min_length) and min_new_tokens (length = prompt length + min_new_tokens)."""

    def __init__(self, length: int, eos: list[int], vocab_size: int, device):
        self.length = length
        self.eos_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.eos_mask[[e for e in eos if 0 <= e < vocab_size]] = True

    def __call__(self, ids, scores):
        if ids.shape[1] >= self.length:
            return scores
        return scores.masked_fill(self.eos_mask, NEG_INF)


class ForcedEOS:
    """At the last step (the sequence is max_length - 1 long) every score is -inf but the eos ids', which
    are 0. BART configs set forced_eos_token_id."""

    def __init__(self, max_length: int, eos: list[int], vocab_size: int, device):
        if any(e < 0 for e in eos):
            raise InvalidInputError(f"forced_eos_token_id must be non-negative token ids, got {eos}.")
        self.max_length = max_length
        self.forced = torch.full((vocab_size,), NEG_INF, device=device)
        self.forced[[e for e in eos if e < vocab_size]] = 0.0

    def __call__(self, ids, scores):
        if ids.shape[1] != self.max_length - 1:
            return scores
        return self.forced.expand_as(scores).clone()


class Temperature:
    def __init__(self, temperature: float):
        if not temperature > 0:
            raise InvalidInputError(f"temperature must be a strictly positive float, got {temperature!r}; "
                                    "for greedy decoding set do_sample=False.")
        self.temperature = float(temperature)

    def __call__(self, ids, scores):
        return scores / self.temperature


class TopK:
    """Keeps the k highest scores (ties with the k-th included); at least min_tokens_to_keep."""

    def __init__(self, k: int, min_tokens_to_keep: int = 1):
        if not isinstance(k, int) or k <= 0:
            raise InvalidInputError(f"top_k must be a positive integer, got {k!r}; 0 disables it.")
        self.k = max(k, min_tokens_to_keep)

    def __call__(self, ids, scores):
        k = min(self.k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1:]
        return scores.masked_fill(scores < kth, NEG_INF)


class TopP:
    """Keeps the smallest set of highest-probability tokens whose mass reaches top_p (nucleus);
    at least min_tokens_to_keep."""

    def __init__(self, p: float, min_tokens_to_keep: int = 1):
        p = float(p)
        if p < 0 or p > 1.0:
            raise InvalidInputError(f"top_p must be in [0, 1], got {p!r}.")
        self.p = p
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, ids, scores):
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - self.p)
        drop[..., -self.min_tokens_to_keep:] = False
        drop = drop.scatter(1, order, drop)
        return scores.masked_fill(drop, NEG_INF)


class Pipeline:
    """The processors in order; an empty pipeline returns the scores untouched."""

    def __init__(self, steps: list):
        self.steps = steps

    def __call__(self, ids, scores):
        for step in self.steps:
            scores = step(ids, scores)
        return scores

    def __len__(self):
        return len(self.steps)


def build(gc, *, prompt_len: int, eos: list[int] | None, vocab_size: int, device) -> Pipeline:
    """The pipeline for a resolved GenerationConfig (lengths already prepared as transformers does:
    gc.min_length includes the prompt when min_new_tokens is set)."""
    steps = []
    if gc.repetition_penalty is not None and gc.repetition_penalty != 1.0:
        steps.append(RepetitionPenalty(gc.repetition_penalty))
    if gc.no_repeat_ngram_size is not None and gc.no_repeat_ngram_size > 0:
        steps.append(NoRepeatNGram(gc.no_repeat_ngram_size))
    if gc.bad_words_ids is not None:
        steps.append(BadWords(gc.bad_words_ids, eos, vocab_size, device))
    if gc.min_length is not None and eos is not None and gc.min_length > 0:
        steps.append(MinLength(gc.min_length, eos, vocab_size, device))
    if gc.min_new_tokens is not None and eos is not None and gc.min_new_tokens > 0:
        steps.append(MinLength(prompt_len + gc.min_new_tokens, eos, vocab_size, device))
    if gc.forced_eos_token_id is not None:
        forced = gc.forced_eos_token_id
        steps.append(ForcedEOS(gc.max_length, [forced] if isinstance(forced, int) else list(forced), vocab_size, device))
    if gc.do_sample:
        # beams keep one non-eos token beyond the eos ids, so a continuation always survives
        keep = (len(eos) + 1 if eos is not None else 2) if (gc.num_beams or 1) > 1 else 1
        if gc.temperature is not None and gc.temperature != 1.0:
            steps.append(Temperature(gc.temperature))
        if gc.top_k is not None and gc.top_k != 0:
            steps.append(TopK(gc.top_k, keep))
        if gc.top_p is not None and gc.top_p < 1.0:
            steps.append(TopP(gc.top_p, keep))
    return Pipeline(steps)
