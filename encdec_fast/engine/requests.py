"""Engine requests: what a submitted input becomes, results, statistics, and the settling of futures.

A request is validated and resolved when it is submitted (its generation settings by decode/params.py,
as model.generate resolves them), so that nothing invalid reaches a batch.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EngineClosedError, InvalidInputError, UnsupportedArgumentError

# generate() arguments that make sense for one model.generate call but not for an engine request
REFUSED = {
    "return_dict_in_generate": "the engine returns token ids (and text); call model.generate for scores",
    "output_scores": "the engine returns token ids (and text); call model.generate for scores",
    "output_logits": "the engine returns token ids (and text); call model.generate for logits",
    "decoder_input_ids": "decoder prefixes are not served by the engine; call model.generate",
    "attention_mask": "each engine input is one unpadded sequence; drop the padding instead of masking it",
    "token_type_ids": "the engine encodes every token with type 0; call model.generate for token_type_ids",
    "stop_check_every": "the engine looks at its decode rows every check_every steps (an Engine argument)",
    "encoder_outputs": "each engine input is token ids or a text; call model.generate(encoder_outputs=...)",
    "streamer": "use engine.stream(...), which yields each request's tokens as they are generated",
    "logits_processor": "the engine runs its processors on the device; call model.generate for your own",
    "stopping_criteria": "the engine takes stop strings (stop=[...]); call model.generate for other criteria",
    "tokenizer": "the engine decodes with its own tokenizer: pass Engine(model, decoder_tokenizer=...)",
    "max_time": "the engine does not time requests; cancel a request's future (or close its stream) instead",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model")


@dataclass
class Result:
    """One request's output.

    output_ids: decoder start + generated tokens, as model.generate returns the input's row alone (no
    batch padding); a list of such rows when num_return_sequences > 1 (padded among themselves, as
    model.generate pads them). text: the decoded output (skip_special_tokens) when the input was a
    string, else None (a list for several sequences). num_generated: tokens generated, eos included,
    padding excluded, summed over the sequences."""

    output_ids: list
    text: str | list | None
    num_generated: int
    input_ids: list


@dataclass
class EngineStats:
    requests_submitted: int = 0
    requests_completed: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    requests_waiting: int = 0  # submitted, not started yet (a snapshot)
    requests_running: int = 0  # in the decode pool (a snapshot)
    tokens_generated: int = 0
    busy_s: float = 0.0  # scheduler time spent working
    wall_s: float = 0.0  # since the engine started
    decode_steps: int = 0
    mean_rows_per_step: float = 0.0
    # how long the scheduler's current turn has been running (0 when idle or between turns): a turn
    # normally lasts milliseconds (a few decode steps), so seconds here mean the engine is stuck in one
    stalled_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_generated / self.busy_s if self.busy_s > 0 else 0.0


@dataclass(eq=False)
class Request:
    """One submitted input, resolved: its token ids, its generation settings, its seed (sampling), and its
    progress as the engine's thread knows it."""

    ids: list[int]
    params: object  # decode/params.py's GenParams, for a batch of one
    is_text: bool = False
    seed: int | None = None
    future: object = None  # its RequestFuture
    stream: object = None  # a stream.Channel when the request is streamed
    streamed: int = 0  # tokens per sequence handed to the stream so far
    cancelled: bool = False  # set by RequestFuture.cancel; the decode pool drops the request at its next look
    eos: frozenset = field(init=False)

    def __post_init__(self):
        self.eos = frozenset(self.params.eos or ())

    @property
    def rows(self) -> int:
        """Decode rows the request takes: its beams, or its returned sequences."""
        return self.params.rows_per_input


def too_many_rows(params, slots: int) -> UnsupportedArgumentError:
    rows = params.rows_per_input
    what = f"num_beams={params.num_beams}" if params.num_beams > 1 else f"num_return_sequences={rows}"
    return UnsupportedArgumentError(f"{what} needs {rows} decode rows but the engine has max_batch_size={slots}; "
                                    "lower it, or raise the engine's max_batch_size.")


def count_generated(row: list[int], eos: set, length: int | None = None) -> int:
    """Tokens generated in a row (decoder start excluded): up to its first eos, included, or its length (the
    tokens it held when it stopped: a row stopped by a stop string is padded after it), else all of it."""
    end = len(row) if length is None else min(length, len(row))
    for j in range(1, end):
        if row[j] in eos:
            return j
    return end - 1


class Outcomes:
    """Tokenizers, statistics and the settling of futures: shared by the Engine and its scheduler thread
    (which must not hold the Engine itself, so that an Engine dropped without close() is collected)."""

    def __init__(self, model, tokenizer, decoder_tokenizer):
        self.model = model
        self.tok, self.dec_tok = tokenizer, decoder_tokenizer
        self.tok_lock = threading.Lock()
        self.lock = threading.Lock()
        self.stats = EngineStats()

    def tokenizers(self):
        with self.tok_lock:
            if self.tok is None:
                path = getattr(self.model, "path", None)
                if path is None:
                    raise InvalidInputError("string inputs and stop strings need a tokenizer but this model was not loaded from a "
                                            "folder; pass Engine(model, tokenizer=...) or token ids.")
                # transformers 5 builds an empty-vocabulary tokenizer from config.json alone: insist on its files
                if not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
                    raise InvalidInputError(f"string inputs and stop strings need a tokenizer but {str(path)!r} has none (no "
                                            f"{' / '.join(_TOKENIZER_FILES[:2])}); save one there "
                                            "(tokenizer.save_pretrained), pass Engine(model, tokenizer=...), or submit token ids.")
                try:
                    from transformers import AutoTokenizer

                    self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                except ImportError as e:  # a sentencepiece tokenizer (spiece.model) without the sentencepiece package
                    raise InvalidInputError(f"the tokenizer in {str(path)!r} needs a package that is not installed ({e}); "
                                            "pip install sentencepiece (an encdec_fast dependency), or submit token ids.") from None
                except (OSError, ValueError, TypeError, KeyError) as e:
                    raise InvalidInputError(f"string inputs and stop strings need a tokenizer, and none could be loaded from {str(path)!r} "
                                            f"({type(e).__name__}: {e}); save one there (tokenizer.save_pretrained), "
                                            "pass Engine(model, tokenizer=...), or submit token ids.") from None
            return self.tok, (self.dec_tok if self.dec_tok is not None else self.tok)

    def encode_text(self, text: str) -> list[int]:
        tok, _ = self.tokenizers()
        with self.tok_lock:  # fast tokenizers are not safe to call from several threads at once
            return list(tok(text)["input_ids"])

    def decode_text(self, rows: list[list[int]]) -> list[str]:
        _, dtok = self.tokenizers()
        with self.tok_lock:
            return [dtok.decode(row, skip_special_tokens=True) for row in rows]

    def stream(self, req: Request, new_rows: list[list[int]]):
        """The one way tokens reach a stream: each sequence's new tokens, in order (every sequence gets
        the same number). Called by the engine's thread whenever a request's tokens reach the host, and
        by finish() with whatever was not streamed yet."""
        if req.stream is not None and new_rows[0]:
            req.streamed += len(new_rows[0])
            req.stream.put(new_rows)

    def finish(self, req: Request, rows: list[list[int]], lengths: list[int] | None = None):
        """Settles req with its rows (as model.generate returns them); lengths: the tokens each row held
        when it stopped, where the pool knows them (num_generated then leaves out a stopped row's padding)."""
        if req.future.done():  # cancelled while it ran
            return
        if req.stream is not None:
            self.stream(req, [row[1 + req.streamed:] for row in rows])
        try:
            n = sum(count_generated(row, req.eos, ln) for row, ln in zip(rows, lengths or [None] * len(rows)))
            text = self.decode_text(rows) if req.is_text else None
            one = req.params.num_return_sequences == 1
            res = Result(rows[0] if one else rows, (text[0] if one else text) if text is not None else None, n, req.ids)
        except Exception as e:  # noqa: BLE001  (decoding the text failed)
            self.fail(req, e)
            return
        with self.lock:
            self.stats.requests_completed += 1
            self.stats.tokens_generated += n
        try:
            req.future.set_result(res)
        except cf.InvalidStateError:  # cancelled by the caller
            pass

    def count_cancel(self):
        with self.lock:
            self.stats.requests_cancelled += 1

    def fail(self, req: Request, exc: BaseException):
        self.fail_future(req.future, exc)

    def fail_future(self, fut: cf.Future, exc: BaseException):
        if fut.done():  # cancelled while it ran
            return
        try:
            fut.set_exception(exc)
        except cf.InvalidStateError:  # cancelled by the caller, or already settled
            return
        with self.lock:
            self.stats.requests_failed += 1


def closed_error():
    return EngineClosedError("the engine was closed before this request finished; submit it to a new Engine.")


class Countdown:
    """Counts settled futures (a done-callback, any thread); drives a tqdm bar (progress=True) or
    progress(done, total)."""

    def __init__(self, total: int, progress):
        self.total, self.left, self.tokens = total, total, 0
        self.progress, self.lock, self.t0 = progress, threading.Lock(), time.perf_counter()
        self.bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="req", desc="encdec_fast")

    def finished(self) -> bool:
        return self.left == 0

    def one(self, fut: cf.Future):
        with self.lock:
            self.left -= 1
            done = self.total - self.left
            if not fut.cancelled() and fut.exception() is None:
                self.tokens += fut.result().num_generated
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix_str(f"{self.tokens / max(time.perf_counter() - self.t0, 1e-9):.1f} tok/s",
                                         refresh=False)
        if self.bar is None and callable(self.progress):
            self.progress(done, self.total)

    def close(self):
        if self.bar is not None:
            self.bar.close()
