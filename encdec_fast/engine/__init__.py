"""Many requests in, results out: the serving engine over an encdec_fast model.

    with encdec_fast.Engine(model, max_batch_size=32) as engine:
        results = engine.generate(["a text", [101, 2023, 102], ...], max_new_tokens=64, progress=True)
        fut = engine.submit([101, 7592, 102], num_beams=4)      # from any thread -> Future[Result]

Every request's tokens are those of `model.generate(ids[None], **same_kwargs)` on it alone: its
generation arguments are resolved by decode/search.py's own code (checkpoint defaults, lengths, special
tokens), its logits processors are decode/select.py's, applied to exactly the ids a solo run sees.

How requests are served (scheduler.py, pool.py):
  - greedy and sampling: continuous batching. The encoder runs on micro-batches of similar source
    length (at most max_batch_tokens padded tokens); each decoder layer's cross K/V is projected once
    into a pool row; decode slots (max_batch_size rows) step together, each at its own position, and
    a finished sequence's slot is refilled by a waiting request without touching the others. A
    sampling request draws from its own torch.Generator: seed=s reproduces
    `torch.manual_seed(s); model.generate(...)`; without seed, one is drawn from torch's global RNG
    when the request is submitted.
  - beam search (num_beams > 1): static batches through model.generate, of requests with the same
    resolved generation settings, sorted by source length; decoding of the other requests pauses while
    such a batch runs. Beam sampling runs each request alone on its seed.

One background thread owns the model; submit() only validates and queues. A request with bad input
or unsupported arguments fails alone (its future holds the encdec_fast error); close() (or leaving the
`with` block on an exception) fails whatever has not finished with EngineClosedError.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
import weakref

import torch

from ..decode import search as gen_mod
from ..decode import select as procs_mod
from ..errors import EngineClosedError, InvalidInputError, UnsupportedArgumentError
from .requests import (
    REFUSED,
    Countdown,
    EngineStats,
    Outcomes,
    Request,
    Result,
    closed_error,
    freeze,
    token_ids,
)
from .scheduler import Scheduler
from .stream import Channel, RequestFuture, TokenStream

__all__ = ["Engine", "EngineStats", "Result", "TokenStream"]


class Engine:
    """Continuous-batching generation over an encdec_fast model (see the module docstring).

    max_batch_size: decode rows stepped together (beam search: rows of one static batch, beams included).
    max_batch_tokens: padded source tokens per encoder micro-batch (and per static beam-search batch).
    max_input_tokens: longer inputs are refused with InvalidInputError (None: the encoder's positions).
    tokenizer / decoder_tokenizer: for string inputs and text outputs; by default loaded from the
    checkpoint folder (model.path) on first use; decoder_tokenizer defaults to tokenizer.

    Futures are settled by the thread running the scheduler (the engine's own, or one inside
    generate()): their done-callbacks run there, inside a turn, and must not block or wait on this engine."""

    def __init__(self, model, max_batch_size: int = 32, max_batch_tokens: int = 16384, *, tokenizer=None,
                 decoder_tokenizer=None, max_input_tokens: int | None = None):
        for name, v in (("max_batch_size", max_batch_size), ("max_batch_tokens", max_batch_tokens),
                        ("max_input_tokens", 1 if max_input_tokens is None else max_input_tokens)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UnsupportedArgumentError(f"{name} must be a positive int, got {v!r}.")
        self.model, self.max_batch_size, self.max_batch_tokens = model, max_batch_size, max_batch_tokens
        self.max_input_tokens = max_input_tokens
        self._out = Outcomes(model, tokenizer, decoder_tokenizer)
        self._t0 = time.perf_counter()
        self._sched = Scheduler(model, max_batch_size, max_batch_tokens, self._out.finish, self._out.fail, closed_error,
                                self._out.stream)
        # dropped without close(): finish what was submitted, then stop the thread
        self._finalizer = weakref.finalize(self, Scheduler.stop, self._sched, True)

    # -- public ----------------------------------------------------------------------------------
    def submit(self, input, **generation_kwargs) -> RequestFuture:
        """Queues one input (a string, or a 1-D sequence of token ids) with model.generate's keyword
        arguments (plus seed= for sampling). Returns a Future of a Result; errors are set on it.
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
        req.stream = Channel(several=req.returned > 1)
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
                 **generation_kwargs) -> list:
        """Generates for every input; returns results in input order. generation_kwargs apply to all;
        request_kwargs (a list of dicts, one per input, or None) add per-input arguments on top.
        progress: True for a tqdm bar, or a callable(done, total). With return_exceptions=False the first
        failed input's error is raised once all have finished; with True errors stand in their place."""
        inputs = list(inputs)
        if request_kwargs is not None and len(request_kwargs) != len(inputs):
            raise InvalidInputError(f"request_kwargs has {len(request_kwargs)} entries but there are {len(inputs)} inputs.")
        n = len(inputs)
        futures: list = [None] * n
        settled = Countdown(n, progress)

        def submit_all():
            reqs = []
            for i in range(n):
                kw = generation_kwargs if request_kwargs is None else {**generation_kwargs, **(request_kwargs[i] or {})}
                futures[i], req = self._make(inputs[i], kw)
                futures[i].add_done_callback(settled.one)
                if req is not None:
                    reqs.append(req)
            # largest step budget first (the longest runs do not end up alone at the tail), then longest
            # source (similar lengths reach the encoder together)
            for req in sorted(reqs, key=lambda r: (-r.max_length, -len(r.ids))):
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
        """A snapshot: requests, tokens generated, busy time (tokens_per_s = tokens / busy time)."""
        with self._out.lock:
            s = EngineStats(**vars(self._out.stats))
        sched = self._sched
        pool = sched.pool
        s.busy_s, s.wall_s = sched.busy_s, time.perf_counter() - self._t0
        s.requests_waiting, s.requests_running = sched.counts()
        if pool is not None:
            s.decode_steps = pool.steps
            s.mean_rows_per_step = pool.rows_stepped / pool.steps if pool.steps else 0.0
        return s

    def close(self, drain: bool = False, timeout: float | None = None):
        """Stops the engine. drain=False: every request not finished yet fails with EngineClosedError (a
        beam-search batch already running completes first). drain=True: finishes what was submitted.
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
        """Validates one request and resolves its generation arguments with decode/search.py's own code."""
        model = self.model
        kwargs = dict(kwargs)
        seed = kwargs.pop("seed", None)
        gen_config = kwargs.pop("generation_config", None)
        for name, why in REFUSED.items():
            if kwargs.get(name) not in (None, False):
                raise UnsupportedArgumentError(f"Engine does not take {name}: {why}.")
            kwargs.pop(name, None)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise UnsupportedArgumentError(f"seed must be an int, got {seed!r}.")
        r = Request()
        gc, _, has_default_max_length = gen_mod.resolve_config(model, gen_config, kwargs)
        r.is_text = isinstance(inp, str)
        r.ids = token_ids(self._out.encode_text(inp) if r.is_text else inp, model.cfg.encoder)
        if self.max_input_tokens is not None and len(r.ids) > self.max_input_tokens:
            raise InvalidInputError(f"input has {len(r.ids)} tokens, more than this engine's max_input_tokens="
                                    f"{self.max_input_tokens}; send a shorter input.")
        eos, r.pad, start = gen_mod.special_tokens(gc, 1)
        gen_mod.prepare_lengths(model, gc, has_default_max_length, 1)
        pipeline = procs_mod.build(gc, prompt_len=1, eos=eos, vocab_size=model.cfg.decoder.vocab_size, device="cpu")
        r.gc, r.kwargs, r.generation_config = gc, kwargs, gen_config
        r.eos, r.eos_set, r.start, r.max_length = eos, set(eos or ()), start[0], gc.max_length
        beams = gc.num_beams or 1
        r.returned = gc.num_return_sequences or 1
        r.rows = max(beams, r.returned)
        if gc.do_sample and seed is None:  # drawn from torch's global RNG: torch.manual_seed makes runs repeatable
            seed = int(torch.randint(0, 2**62, (1,)).item())
        r.seed = seed
        r.proc_key = None
        if len(pipeline):  # requests whose processors are the same share one call per step
            with self._out.lock:
                keys = self._out.proc_keys
                r.proc_key = keys.setdefault(freeze(pipeline.steps), len(keys))
        if beams > 1:
            r.static_key = repr(sorted(gc.to_dict().items())) + (f"|seed={seed}" if gc.do_sample else "")
        else:
            r.static_key = None
            if r.rows > self.max_batch_size:
                raise UnsupportedArgumentError(f"num_return_sequences={r.rows} needs {r.rows} decode rows but the engine "
                                               f"has max_batch_size={self.max_batch_size}; raise max_batch_size.")
        return r
