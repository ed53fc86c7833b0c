"""Token streaming: one engine request consumed chunk by chunk, from a thread or from a coroutine.

    stream = engine.stream([101, 7592, 102], max_new_tokens=32)
    for chunk in stream:                 # new token ids as they reach the host, e.g. [2023] or [2023, 2003]
        ...
    result = stream.result()             # the Result, exactly what engine.submit(...).result() gives

    async for chunk in engine.astream("a text", max_new_tokens=32):    # the same object, async
        ...

A chunk is a list of token ids (a list of such lists, one per sequence, with num_return_sequences > 1;
a finished sequence's later chunks are pad tokens, as model.generate pads it). The decoder start token
is never streamed: [start] + the chunks concatenated == result.output_ids, token for token.
Requests stream every time tokens reach the host (each look at the decode rows: every step on the CPU,
every 16 on CUDA); beam-search requests, whose running beams are not final, stream their tokens as one
chunk when they finish.

How tokens travel: the engine's thread hands a request's new tokens to Outcomes.stream (requests.py),
which puts them into the request's Channel; the request's future settles after its last chunk.
The engine holds only the Channel, never the TokenStream, so a TokenStream nobody holds is collected.

Cancelling: close() (or leaving a `with`/`async with` block, or dropping the stream unfinished, which a
`for` loop broken out of does when it held the only reference) cancels the request through
RequestFuture.cancel: a waiting request never starts; a running one leaves the decode pool at its
next host check, which frees its slots for other requests. Iteration then stops and result() raises
RequestCancelledError.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
from collections import deque

from ..errors import RequestCancelledError

_EMPTY, _END = object(), object()


class RequestFuture(cf.Future):
    """A request's future. cancel() stops the request at any stage: before it starts (as Future.cancel
    does: cancelled() becomes True), or while it runs (the request is flagged, the pool drops it at
    its next host check, and the future ends with RequestCancelledError). Returns False only when
    the request has already finished."""

    def __init__(self, on_cancel=None):
        super().__init__()
        self.request = None  # the validated Request, once there is one
        self._on_cancel = on_cancel

    def cancel(self) -> bool:
        if self.done():  # finished, failed or cancelled already: nothing to stop
            return self.cancelled() or isinstance(self.exception(), RequestCancelledError)
        if not super().cancel():  # it runs: flag it for the pool
            req = self.request
            if req is None:
                return False
            req.cancelled = True  # read by the decode pool at its next host check
            try:
                self.set_exception(cancelled_error())
            except cf.InvalidStateError:  # it finished meanwhile
                return self.cancelled()
        if self._on_cancel is not None:
            self._on_cancel()
        return True


def cancelled_error() -> RequestCancelledError:
    return RequestCancelledError("the request was cancelled (its stream was closed, its future cancelled, or its "
                                 "HTTP client went away) before it finished; submit it again for a result.")


class Channel:
    """The engine side of a stream: chunks in order, and a way to wake the consumer (a thread waiting
    on the condition, or an event loop through wake)."""

    def __init__(self, several: bool):
        self.several = several
        self.chunks: deque = deque()
        self.cv = threading.Condition()
        self.wake = None  # set by an async consumer: a thread-safe callable that wakes its loop
        self.ended = False

    def put(self, rows: list[list[int]]):
        """New tokens of each sequence (called by Outcomes.stream, in the engine's thread)."""
        with self.cv:
            self.chunks.append(rows if self.several else rows[0])
            self.cv.notify_all()
            wake = self.wake
        if wake is not None:
            wake()

    def end(self, _future=None):
        """The future settled: no chunk follows (a done-callback; any thread)."""
        with self.cv:
            self.ended = True
            self.cv.notify_all()
            wake = self.wake
        if wake is not None:
            wake()

    def take(self, block: bool):
        """The next chunk, _END once the request has ended and every chunk was taken, or _EMPTY
        (only when block is False)."""
        with self.cv:
            while block and not self.chunks and not self.ended:
                self.cv.wait()
            if self.chunks:
                return self.chunks.popleft()
            return _END if self.ended else _EMPTY


class TokenStream:
    """Iterator and async iterator over a request's token chunks (see the module docstring).

    future: the request's RequestFuture; result() and aresult() wait for it."""

    def __init__(self, future: RequestFuture, channel: Channel):
        self.future, self._channel = future, channel
        self._event = None  # asyncio.Event of an async consumer
        future.add_done_callback(channel.end)

    # -- the result ------------------------------------------------------------------------------
    def result(self, timeout: float | None = None):
        """The request's Result (blocks until it finishes); raises its error, or RequestCancelledError."""
        try:
            return self.future.result(timeout)
        except cf.CancelledError as e:
            if isinstance(e, RequestCancelledError):
                raise
            raise cancelled_error() from None

    async def aresult(self):
        """result() for a coroutine: awaits the request without blocking the event loop. Cancelling the
        awaiting task cancels the request."""
        try:
            return await asyncio.wrap_future(self.future)
        except asyncio.CancelledError:  # a future cancelled before it started cancels its asyncio wrapper
            task = asyncio.current_task()
            cancelling = task is not None and getattr(task, "cancelling", lambda: 0)()  # Python >= 3.11
            if self.future.cancelled() and not cancelling:
                raise cancelled_error() from None
            raise

    def _finish_iteration(self, stop):
        """After the last chunk: the request's error is raised; a finished or cancelled one stops."""
        exc = None if self.future.cancelled() else self.future.exception()
        if exc is not None and not isinstance(exc, RequestCancelledError):
            raise exc
        raise stop

    # -- sync iteration ----------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        item = self._channel.take(block=True)
        if item is _END:
            self._finish_iteration(StopIteration)
        return item

    # -- async iteration ---------------------------------------------------------------------------
    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._event is None:
            loop, event = asyncio.get_running_loop(), asyncio.Event()

            def wake():
                try:
                    loop.call_soon_threadsafe(event.set)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    pass

            self._event = event
            with self._channel.cv:
                self._channel.wake = wake
        while True:
            self._event.clear()  # before take(): a chunk put after take() sets it again
            item = self._channel.take(block=False)
            if item is _EMPTY:
                await self._event.wait()
                continue
            if item is _END:
                self._finish_iteration(StopAsyncIteration)
            return item

    # -- cancelling --------------------------------------------------------------------------------
    def close(self) -> bool:
        """Cancels the request unless it has finished (then a no-op). Returns True if it was cancelled."""
        return self.future.cancel() if not self.future.done() else False

    async def aclose(self) -> bool:
        return self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()

    def __del__(self):
        fut = getattr(self, "future", None)
        if fut is not None and not fut.done():
            fut.cancel()
