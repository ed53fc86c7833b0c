"""Many requests in, results out: the serving engine over an encdec_fast model.

    with encdec_fast.Engine(model, max_batch_size=32) as engine:
        results = engine.generate(["a text", [101, 2023, 102], ...], max_new_tokens=64, progress=True)
        fut = engine.submit([101, 7592, 102], num_beams=4)      # from any thread -> Future[Result]

Every request's tokens are those of `model.generate(ids[None], **same_kwargs)` on it alone: its
generation settings are resolved by decode/params.py (checkpoint defaults, lengths, special tokens), as
generate() resolves them, and its logits processors are decode/select.py's, applied to exactly the ids a
solo run sees.

How requests are served (scheduler.py, pool.py): every request, whatever its kind (greedy, sampling,
beam search, beam sampling), joins one decode state (decode/state.py, the state and step generate()
runs) and leaves it when it finishes: continuous batching. The encoder runs on packed micro-batches (no
padding computed) of at most max_batch_tokens real source tokens; each decoder layer's cross K/V is
projected once, from the packed states, into the request's slot of the cross-K/V arena; decode rows
(max_batch_size) step together, each at its own position; a beam request's beams are rows of an aligned
block reading that slot. The host looks at the stop marks every few steps (16 on CUDA), and a finished,
failed or cancelled request's rows are refilled by waiting requests without touching the others. A
sampling request (beam sampling included) draws from its own torch.Generator: seed=s reproduces
`torch.manual_seed(s); model.generate(...)`; without seed, one is drawn from torch's global RNG when the
request is submitted. A request may carry stop strings (stop=["\n\n"]): the engine checks them on the host
at each look, and the request ends at the token that completes one, as model.generate(stop_strings=...,
tokenizer=...) ends (engine/pool.py). A request is bounded when it is submitted: its rows by max_batch_size, its tokens
by max_request_tokens, its input by max_input_tokens.

One background thread owns the model; submit() only validates and queues (encdec_fast/validate.py, the
same checks as model.generate), so a request with bad input or unsupported arguments fails alone, its
future holding the encdec_fast error. Whatever still fails inside a batch is pinned on the request that
caused it (scheduler.py): NaN/inf logits fail their own request; a failed encoder micro-batch or decode
step reruns its requests one by one through model.generate, and only a request that fails alone gets an
error. close() (or leaving the `with` block on an exception) fails whatever has not finished with
EngineClosedError; so does the end of the interpreter for an engine never closed (exit code 0), and an
engine garbage-collected without close() finishes what was submitted.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import threading
import time
import weakref

import torch

from .. import validate
from ..decode.params import resolve
from ..errors import EngineClosedError, InvalidInputError, UnsupportedArgumentError
from .requests import (
    REFUSED,
    Countdown,
    EngineStats,
    Outcomes,
    Request,
    Result,
    closed_error,
    too_many_rows,
)
from .scheduler import Scheduler
from .stream import Channel, RequestFuture, TokenStream

__all__ = ["Engine", "EngineStats", "Result", "TokenStream"]


class Engine:
    """Continuous-batching generation over an encdec_fast model (see the module docstring).

    max_batch_size: decode rows stepped together (a request's beams or returned sequences each take one).
    max_batch_tokens: real source tokens per (packed) encoder micro-batch.
    max_input_tokens: longer inputs are refused with InvalidInputError (None: the encoder's positions).
    max_request_tokens: a request's decode rows x (input + output tokens) above this are refused with
    InvalidInputError (None: no limit beyond max_batch_size rows and the positions).
    tokenizer / decoder_tokenizer: for string inputs and text outputs; by default loaded from the
    checkpoint folder (model.path) on first use; decoder_tokenizer defaults to tokenizer.
    check_every: decode steps between looks at which requests finished (default 1 on CPU, 16 on CUDA):
    fewer looks, fewer host syncs; more looks, finished rows refilled sooner.

    Futures are settled by the thread running the scheduler (the engine's own, or one inside
    generate()): their done-callbacks run there, inside a turn, and must not block or wait on this engine."""

    def __init__(self, model, max_batch_size: int = 32, max_batch_tokens: int = 16384, *, tokenizer=None,
                 decoder_tokenizer=None, check_every: int | None = None, max_input_tokens: int | None = None,
                 max_request_tokens: int | None = None):
        for name, v in (("max_batch_size", max_batch_size), ("max_batch_tokens", max_batch_tokens),
                        ("check_every", check_every), ("max_input_tokens", max_input_tokens),
                        ("max_request_tokens", max_request_tokens)):
            validate.number(v, name, validate.Field("int", 1))
        self.model, self.max_batch_size, self.max_batch_tokens = model, max_batch_size, max_batch_tokens
        self.max_input_tokens, self.max_request_tokens = max_input_tokens, max_request_tokens
        self._out = Outcomes(model, tokenizer, decoder_tokenizer)
        self._t0 = time.perf_counter()
        self._sched = Scheduler(model, max_batch_size, max_batch_tokens, self._out.finish, self._out.fail, closed_error,
                                check_every, self._out.stream)
        # dropped without close(): finish what was submitted, then stop the thread
        self._finalizer = weakref.finalize(self, Scheduler.stop, self._sched, True)

    # -- public ----------------------------------------------------------------------------------
    def submit(self, input, **generation_kwargs) -> RequestFuture:
        """Queues one input (a string, or a 1-D sequence of token ids) with model.generate's keyword
        arguments (plus seed= for sampling, and stop=[strings]: the request finishes at the token that
        completes one of them in its decoded output, as model.generate(stop_strings=..., tokenizer=...) on
        it alone). Returns a Future of a Result; errors are set on it.
        future.cancel() stops the request even while it runs (its decode slots are freed)."""
        fut, req = self._make(input, generation_kwargs)
        if req is not None:
            self._enqueue(req)
        return fut

    def stream(self, input, **generation_kwargs) -> TokenStream:
        """Submits one input like submit() and returns a TokenStream: iterate it (for, or async for) for
        the new token ids as they are generated; stream.result() then gives the Result. Closing the
        stream (or dropping it unfinished) cancels the request and frees its decode slots. A bad input
        or argument, or a closed engine, raises its encdec_fast error here. See engine/stream.py."""
        fut, req = self._make(input, generation_kwargs)
        if req is None:
            raise fut.exception()
        req.stream = Channel(several=req.params.num_return_sequences > 1)
        stream = TokenStream(fut, req.stream)
        if not self._enqueue(req):
            raise fut.exception()
        return stream

    def astream(self, input, **generation_kwargs) -> TokenStream:
        """stream() for coroutines: the same TokenStream, to be consumed with `async for` (and
        `await stream.aresult()`). Submitting never blocks on the model, so it is safe in an event loop
        (a text input is tokenised here, which takes microseconds once the tokenizer is loaded)."""
        return self.stream(input, **generation_kwargs)

    def detokenize(self, token_ids) -> str:
        """Text of one sequence of output token ids (special tokens skipped), with the decoder tokenizer
        that string inputs' results use."""
        return self._out.decode_text([list(token_ids)])[0]

    def _make(self, input, generation_kwargs):
        """-> (future, request), or (future holding the error, None)."""
        fut = RequestFuture(on_cancel=self._out.count_cancel)
        with self._out.lock:
            self._out.stats.requests_submitted += 1
        try:
            req = self._prepare(input, generation_kwargs)
        except Exception as e:  # noqa: BLE001  the request fails alone
            self._out.fail_future(fut, e)
            return fut, None
        req.future, fut.request = fut, req
        return fut, req

    def _enqueue(self, req) -> bool:
        if not self._sched.put(req):
            self._out.fail_future(req.future, EngineClosedError("the engine is closed; create a new Engine to "
                                                                "submit requests."))
            return False
        return True

    def generate(self, inputs, *, progress=False, return_exceptions: bool = False, request_kwargs=None,
                 on_result=None, **generation_kwargs) -> list:
        """Generates for every input; returns results in input order. generation_kwargs apply to all;
        request_kwargs (a list of dicts, one per input, or None) add per-input arguments on top.
        progress: True for a tqdm bar, or a callable(done, total). With return_exceptions=False the first
        failed input's error is raised once all have finished; with True errors stand in their place.
        on_result: a callable(index, Result or exception) called as each input settles (cancelled ones
        excepted), in the thread driving the engine: save finished work as it comes."""
        inputs = _input_list(inputs)
        if request_kwargs is not None:
            request_kwargs = _input_list(request_kwargs, "request_kwargs")
            if len(request_kwargs) != len(inputs):
                raise InvalidInputError(f"request_kwargs has {len(request_kwargs)} entries but there are {len(inputs)} "
                                        "inputs.")
            bad = next((kw for kw in request_kwargs if kw is not None and not isinstance(kw, dict)), None)
            if bad is not None:
                raise InvalidInputError(f"request_kwargs entries must be dicts (or None), got {type(bad).__name__}.")
        validate.number(return_exceptions, "return_exceptions", validate.Field("bool"))
        if not (progress is None or isinstance(progress, bool) or callable(progress)):
            raise InvalidInputError(f"progress must be True, False or a callable(done, total), got {progress!r}.")
        if on_result is not None and not callable(on_result):
            raise InvalidInputError(f"on_result must be a callable(index, result or exception), got {on_result!r}.")
        n = len(inputs)
        futures: list = [None] * n
        settled = Countdown(n, progress)

        def submit_all():
            reqs = []
            for i in range(n):
                kw = generation_kwargs if request_kwargs is None else {**generation_kwargs, **(request_kwargs[i] or {})}
                futures[i], req = self._make(inputs[i], kw)
                if on_result is not None:  # before settled.one: saved before generate() can return
                    futures[i].add_done_callback(functools.partial(_report, on_result, i))
                futures[i].add_done_callback(settled.one)
                if req is not None:
                    reqs.append(req)
            # largest step budget first (the longest runs do not end up alone at the tail), then longest
            # source (similar lengths reach the encoder together)
            for req in sorted(reqs, key=lambda r: (-r.params.max_length, -len(r.ids))):
                self._enqueue(req)

        try:
            self._sched.drive(settled.finished, first=submit_all)
            cf.wait([f for f in futures if f is not None])  # settled by the background thread if it stopped
        except BaseException:
            for f in futures:  # interrupted: what has not started yet need not run
                if f is not None:
                    f.cancel()
            raise
        finally:
            settled.close()
        results = [f.exception() or f.result() for f in futures]
        if not return_exceptions:
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        return results

    def drive(self, until) -> None:
        """Runs the engine's turns (the model's work) in the calling thread until until() returns True or
        the engine stops; the background thread stands aside meanwhile, and requests submitted from
        other threads are served here. generate() does the same while it waits. Use it to keep every
        torch op on one thread (the server's main thread: engine/scheduler.py says why on CPUs)."""
        self._sched.drive(until)

    @property
    def stats(self) -> EngineStats:
        """A snapshot: requests, tokens generated, busy time (tokens_per_s = tokens / busy time), and
        stalled_s, how long the current turn has been running (the server's /health reads it)."""
        with self._out.lock:
            s = EngineStats(**vars(self._out.stats))
        sched = self._sched
        pool = sched.pool
        now = time.perf_counter()
        s.busy_s, s.wall_s = sched.busy_s, now - self._t0
        started = sched.turn_started
        s.stalled_s = now - started if started is not None else 0.0
        s.requests_waiting, s.requests_running = sched.counts()
        s.decode_steps = pool.steps
        s.mean_rows_per_step = pool.rows_stepped / pool.steps if pool.steps else 0.0
        return s

    def close(self, drain: bool = False, timeout: float | None = None):
        """Stops the engine. drain=False: every request not finished yet fails with EngineClosedError.
        drain=True: finishes what was submitted.
        Waits for the scheduler thread (at most timeout seconds). Idempotent."""
        self._sched.stop(drain)
        me = threading.current_thread()
        if me is not self._sched.thread and me is not self._sched.turn_thread:  # not from a done-callback
            self._sched.thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(drain=exc_type is None)

    # -- requests ---------------------------------------------------------------------------------
    def _prepare(self, inp, kwargs) -> Request:
        """Validates one request and resolves its generation settings (decode/params.py, as model.generate)."""
        model = self.model
        kwargs = dict(kwargs)
        seed = kwargs.pop("seed", None)
        gen_config = kwargs.pop("generation_config", None)
        for name, why in REFUSED.items():
            if kwargs.get(name) is not None and kwargs.get(name) is not False:
                raise UnsupportedArgumentError(f"Engine does not take {name}: {why}.")
            kwargs.pop(name, None)
        validate.number(seed, "seed", validate.SEED)
        self._stop_strings(kwargs, gen_config)
        params = resolve(model, gen_config, kwargs, batch=1)
        if params.gc.max_time is not None:
            raise UnsupportedArgumentError(f"Engine does not take max_time (set by a generation config): "
                                           f"{REFUSED['max_time']}.")
        if params.host is not None and params.num_beams > 1:
            raise UnsupportedArgumentError("the engine serves stop strings for greedy and sampling requests, not beam "
                                           "search; call model.generate(stop_strings=..., tokenizer=...) for beams.")
        is_text = isinstance(inp, str)
        ids = validate.token_ids(self._out.encode_text(inp) if is_text else inp, "input", model.cfg.encoder,
                                 one_sequence=True).tolist()
        if self.max_input_tokens is not None and len(ids) > self.max_input_tokens:
            raise InvalidInputError(f"input has {len(ids)} tokens, more than this engine's max_input_tokens="
                                    f"{self.max_input_tokens}; send a shorter input.")
        if params.rows_per_input > self.max_batch_size:
            raise too_many_rows(params, self.max_batch_size)
        tokens = params.rows_per_input * (len(ids) + params.max_length)
        if self.max_request_tokens is not None and tokens > self.max_request_tokens:
            raise InvalidInputError(
                f"this request takes {params.rows_per_input} decode rows x ({len(ids)} input + {params.max_length} "
                f"output tokens) = {tokens} tokens, more than this engine's max_request_tokens={self.max_request_tokens}; "
                "lower num_beams, num_return_sequences or max_new_tokens, or send a shorter input.")
        if params.do_sample and seed is None:  # drawn from torch's global RNG: torch.manual_seed makes runs repeatable
            seed = int(torch.randint(0, 2**62, (1,)).item())
        return Request(ids=ids, params=params, is_text=is_text, seed=seed)


    def _stop_strings(self, kwargs: dict, gen_config):
        """stop= (stop strings, or transformers' stop_strings=) -> kwargs' stop_strings, with this engine's decoder
        tokenizer, which resolve() builds transformers' StopStringCriteria with (decode/host.py)."""
        stop = kwargs.pop("stop", None)
        if stop is not None:
            if kwargs.get("stop_strings") is not None:
                raise InvalidInputError("pass stop= or stop_strings=, not both (they are the same setting).")
            kwargs["stop_strings"] = list(validate.stop_strings(stop, "stop"))
        configs = (gen_config, self.model.generation_config)
        if kwargs.get("stop_strings") is not None or any(getattr(c, "stop_strings", None) for c in configs):
            kwargs["tokenizer"] = self._out.tokenizers()[1]


def _input_list(inputs, name: str = "inputs") -> list:
    if isinstance(inputs, (str, bytes)) or not hasattr(inputs, "__iter__"):
        raise InvalidInputError(f"{name} must be a list (one entry per input), got {type(inputs).__name__}; for one "
                                "input pass [input], or use submit().")
    return list(inputs)


def _report(on_result, i: int, fut: cf.Future):
    if not fut.cancelled():
        on_result(i, fut.exception() or fut.result())
