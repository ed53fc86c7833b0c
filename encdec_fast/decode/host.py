"""What generate() runs on the host: transformers' streamer, stopping criteria and the caller's own logits
processors (and the Engine's stop strings, through the same criteria).

transformers' generate() takes objects that run in Python during its loop (5.x, GenerationMixin):

  streamer=           put(the decoder prompt (N, P)) before the first step, put(each step's tokens (N,)),
                      end() after the last; refused with beam search (as transformers refuses it)
  stopping_criteria=  StoppingCriteria on input_ids (N, length) after each step: a row they fire for is
                      finished (fed and padded with pad_token_id when an eos criterion is present, as
                      _sample pads), and generation ends when every row is; beam search applies them to
                      every candidate (a candidate they fire for is finished, as an eos would finish it)
  logits_processor=   LogitsProcessors appended after the built-in ones (_merge_criteria_processor_list),
                      so before the sampling warpers (temperature, top-k, top-p)

plus the criteria a GenerationConfig asks for: max_time (MaxTimeCriteria, timed from the first step) and
stop_strings with tokenizer= (StopStringCriteria; for a vocabulary transformers' StopStringCriteria cannot
be built for, such as a WordPiece one without the token "abcdef", TextStopCriteria, which stops a row at the
token whose decoded text completes a stop string). resolve() merges them once, as _get_stopping_criteria
and _get_logits_processor merge them, into a frozen Host; eos and max_length stay on the device. A custom
object of a type generate() also builds from its settings replaces the built-in one in transformers;
here that is refused (pass the setting instead), except for criteria that only run on the host.

Costs: a generate() with a Host looks at the rows after every step (the host needs each step's tokens);
its steps stay captured on CUDA unless the host must run inside them (the caller's processors, or
criteria on beam candidates: decode/step.py's StepHooks), which makes them eager. Without a Host
nothing here runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import validate
from ..errors import InvalidInputError, UnsupportedArgumentError
from .step import StepHooks


@dataclass(frozen=True)
class Host:
    """One request's host-side work (see the module docstring). processors: the caller's LogitsProcessors,
    in transformers' order. criteria: the StoppingCriteria checked on the host (max_time excepted).
    max_time: seconds, timed when decoding starts. pad_stopped: rows the criteria stop are padded (an eos
    criterion is present)."""

    streamer: object = None
    processors: tuple = ()
    criteria: tuple = ()
    max_time: float | None = None
    pad_stopped: bool = True

    @property
    def stops(self) -> bool:
        """Whether criteria run on the host."""
        return bool(self.criteria) or self.max_time is not None


def resolve(gc, call: dict, *, eos, pad, rows: int) -> Host | None:
    """The Host of a generate() call: call holds its streamer / logits_processor / stopping_criteria /
    tokenizer arguments; gc is the resolved GenerationConfig; rows: decode rows (batch x sequences). None
    when nothing runs on the host."""
    streamer = call.get("streamer")
    if streamer is not None:
        _check_streamer(streamer, gc, rows)
    processors = merge_processors(gc, eos, call.get("logits_processor"))
    criteria, pad_stopped = merge_criteria(gc, eos, pad, call.get("stopping_criteria"), call.get("tokenizer"))
    user_time = any(_named(c, "MaxTimeCriteria") for c in criteria)
    max_time = gc.max_time if not user_time else None
    if streamer is None and not processors and not criteria and max_time is None:
        return None
    return Host(streamer=streamer, processors=processors, criteria=criteria, max_time=max_time,
                pad_stopped=pad_stopped)


def _named(obj, name: str) -> bool:
    """obj is exactly transformers' class `name` (transformers merges a caller's objects by exact type)."""
    import transformers.generation as g

    return type(obj) is getattr(g, name)


def _check_streamer(streamer, gc, rows: int):
    if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise InvalidInputError(f"streamer must have put(token_ids) and end() (a transformers BaseStreamer such as "
                                f"TextStreamer), got {type(streamer).__name__}.")
    if (gc.num_beams or 1) > 1:
        raise UnsupportedArgumentError("streamer cannot be used with beam search (num_beams > 1), as in transformers; "
                                       "set num_beams=1, or use the Engine's streams, which give a beam request's "
                                       "tokens when it finishes.")
    from transformers import TextStreamer

    if rows > 1 and isinstance(streamer, TextStreamer):
        raise UnsupportedArgumentError(f"{type(streamer).__name__} streams one sequence, but this call decodes {rows} "
                                       "(batch x num_return_sequences); pass one input and num_return_sequences=1, "
                                       "or use the Engine's streams (one per request).")


def _callables(items, name: str, kind: str) -> list:
    if items is None:
        return []
    if not isinstance(items, (list, tuple)):
        raise InvalidInputError(f"{name} must be a list (a transformers {kind}), got {type(items).__name__}.")
    bad = next((x for x in items if not callable(x)), None)
    if bad is not None:
        raise InvalidInputError(f"{name} entries must be callables (input_ids, scores), got {type(bad).__name__}.")
    return list(items)


def merge_processors(gc, eos, custom) -> tuple:
    """The caller's processors as transformers appends them (an equal one once); one of a type generate()
    builds from this call's settings is refused (transformers would run it in the built-in one's place)."""
    custom = _callables(custom, "logits_processor", "LogitsProcessorList")
    built_in = {  # what _get_logits_processor builds from the settings encdec_fast implements
        "RepetitionPenaltyLogitsProcessor": ("repetition_penalty", gc.repetition_penalty not in (None, 1.0)),
        "NoRepeatNGramLogitsProcessor": ("no_repeat_ngram_size", (gc.no_repeat_ngram_size or 0) > 0),
        "NoBadWordsLogitsProcessor": ("bad_words_ids", gc.bad_words_ids is not None),
        "MinLengthLogitsProcessor": ("min_length", eos is not None and (gc.min_length or 0) > 0),
        "MinNewTokensLengthLogitsProcessor": ("min_new_tokens", eos is not None and (gc.min_new_tokens or 0) > 0),
        "ForcedEOSTokenLogitsProcessor": ("forced_eos_token_id", gc.forced_eos_token_id is not None),
    }
    out = []
    for p in custom:
        setting, on = built_in.get(type(p).__name__, (None, False))
        if on and _named(p, type(p).__name__):
            raise UnsupportedArgumentError(
                f"logits_processor holds a {type(p).__name__}, which generate() also builds from {setting}= (transformers "
                f"then runs yours in its place); set {setting}= to the value you want instead, or drop it from "
                "logits_processor.")
        if p not in out:
            out.append(p)
    return tuple(out)


def merge_criteria(gc, eos, pad, custom, tokenizer) -> tuple[tuple, bool]:
    """-> (the criteria checked on the host, pad_stopped): the caller's criteria, and those of gc's max_time
    (kept as gc.max_time unless the caller passes a MaxTimeCriteria) and stop_strings, as
    _get_stopping_criteria merges them; eos and max_length stay on the device."""
    from transformers.generation import StopStringCriteria

    out = []
    for c in _callables(custom, "stopping_criteria", "StoppingCriteriaList"):
        if _named(c, "MaxLengthCriteria"):
            raise UnsupportedArgumentError("stopping_criteria holds a MaxLengthCriteria, which generate() builds from "
                                           "max_length; pass max_length= or max_new_tokens= instead.")
        if _named(c, "EosTokenCriteria") and eos is not None:
            ids = sorted(set(c.eos_token_id.tolist()))
            if ids != sorted(set(eos)):
                raise UnsupportedArgumentError(
                    f"stopping_criteria holds an EosTokenCriteria for {ids} while eos_token_id is {list(eos)} (transformers "
                    "then stops on yours alone, yet the min-length processors keep eos_token_id); pass "
                    f"eos_token_id={ids} instead.")
            continue  # the same eos ids: the device stops on them already
        if c not in out:
            out.append(c)
    if gc.stop_strings is not None and not any(_named(c, "StopStringCriteria") for c in out):
        strings = validate.stop_strings(gc.stop_strings, "stop_strings")
        if tokenizer is None:
            raise InvalidInputError("stop_strings needs the tokenizer that decodes the outputs: pass tokenizer= to "
                                    "generate() (as transformers requires).")
        try:
            out.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=list(strings)))
        except ValueError:  # transformers cannot map this vocabulary's tokens to text: match on the text itself
            out.append(TextStopCriteria(tokenizer, strings))
    pad_stopped = eos is not None or any(hasattr(c, "eos_token_id") for c in out)
    if pad_stopped and pad is None:
        raise InvalidInputError("stopping_criteria holds an eos criterion, and finished rows are then padded, but "
                                "pad_token_id is not set; pass pad_token_id=...")
    return tuple(out), pad_stopped


class TextStopCriteria:
    """stop_strings on decoded text: a row stops at the token whose text ends a stop string's occurrence (the
    stop string ends inside that token's text), as StopStringCriteria stops it. For the vocabularies that
    StopStringCriteria cannot be built for; special tokens are not text here."""

    def __init__(self, tokenizer, strings):
        self.tokenizer, self.strings = tokenizer, tuple(strings)

    def _hit(self, row: list[int]) -> bool:
        decode = self.tokenizer.decode
        before, text = decode(row[:-1], skip_special_tokens=True), decode(row, skip_special_tokens=True)
        return any(text.find(s, max(0, len(before) - len(s) + 1)) >= 0 for s in self.strings)

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        return torch.tensor([self._hit(row) for row in input_ids.tolist()], dtype=torch.bool, device=input_ids.device)


def first_hits(criteria, ids: torch.Tensor, start: int, scores=None) -> tuple[list[int], list[int]]:
    """Where any of the criteria (StoppingCriteria) first fires on rows of ids (n, t): each length L in
    start..t is checked as transformers checks it after the step that made L tokens. -> (row indices,
    their lengths)."""
    n, t = ids.shape
    first = [0] * n
    for L in range(start, t + 1):
        hit = torch.zeros(n, dtype=torch.bool, device=ids.device)
        for c in criteria:
            hit = hit | c(ids[:, :L], scores).to(ids.device)
        for i in hit.nonzero().flatten().tolist():
            first[i] = first[i] or L
    rows = [i for i in range(n) if first[i]]
    return rows, [first[i] for i in rows]


class HostLoop:
    """One generate() call's host side, over `state`'s first N rows (B inputs, P prompt tokens each): the
    streamer's puts, the criteria after each step, and the StepHooks of a step that runs them inside."""

    def __init__(self, host: Host, state, B: int, N: int, P: int, *, beams: bool):
        from transformers.generation import (
            LogitsProcessorList,
            MaxTimeCriteria,
            StoppingCriteriaList,
        )

        self.host, self.state, self.B, self.N, self.P, self.beams = host, state, B, N, P, beams
        timed = [MaxTimeCriteria(host.max_time)] if host.max_time is not None else []  # from the first step
        self.criteria = StoppingCriteriaList(list(host.criteria) + timed)
        self.processors = LogitsProcessorList(host.processors)
        if host.streamer is not None:
            host.streamer.put(state.seq[:N, :P].cpu())

    @property
    def inside(self) -> bool:
        """The host runs inside the steps (their plan has `host`): processors, or criteria on beam candidates."""
        return bool(self.processors) or (self.beams and len(self.criteria) > 0)

    def hooks(self, s: int, kept) -> StepHooks | None:
        """Step s's hooks; kept: the scores transformers hands its criteria (a tuple, or None)."""
        if not self.inside:
            return None
        N, length = self.N, self.P + s

        def scores(x):
            head = self.processors(self.state.seq[:N, :length], x[:N])
            return head if x.shape[0] == N else torch.cat([head, x[N:]])

        def beam_hits(top_seq, x):  # transformers' criteria see this step's scores already kept
            R, K, _ = top_seq.shape
            hit = torch.zeros(R, K, dtype=torch.bool, device=top_seq.device)
            ids = top_seq[:self.B, :, :length + 1].reshape(self.B * K, length + 1)
            now = kept + (x[:N].float(),) if kept is not None else None
            hit[:self.B] = self.criteria(ids, now).view(self.B, K).to(hit.device)
            return hit

        return StepHooks(scores=scores if self.processors else None,
                         beam_hits=beam_hits if self.beams and len(self.criteria) else None)

    def after(self, s: int, kept):
        """After step s: the criteria on every row (greedy and sampling), then the streamer's put."""
        st, N, length = self.state, self.N, self.P + s + 1
        if len(self.criteria) and not self.beams:
            rows, lengths = first_hits(self.criteria, st.seq[:N, :length], length, kept)
            st.stop_rows(rows, lengths, pad=self.host.pad_stopped)
        if self.host.streamer is not None:
            self.host.streamer.put(st.seq[:N, length - 1].cpu())

    def end(self):
        if self.host.streamer is not None:
            self.host.streamer.end()
