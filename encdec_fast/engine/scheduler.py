"""The engine's scheduler: whoever holds its drive lock runs the model, one turn at a time.

Two kinds of thread drive it: its own background thread (always there; it serves submit()), and a
thread blocked in Engine.generate(), which runs the turns itself while it waits, the background
thread standing aside. The reason is the CPU: once two threads have run OpenMP parallel regions,
libgomp throttles its spin-waiting and every torch op pays a thread wake-up (measured: a decode loop
from a second thread runs 2x slower on 2 cores than from the thread that loaded the model). Either
way exactly one thread touches the model at a time.

Each turn:
  1. take the newly submitted requests (beam-sampling ones go to the static queue, the others wait for
     decode rows);
  2. run one beam-sampling request, if any waits, alone through model.generate on its seed (this
     pauses the decode rows while it runs);
  3. refill free decode rows (continuous batching): waiting requests join in arrival order once a
     few rows are free (or all the waiting ones fit), encoded in micro-batches of similar length;
  4. a few decode steps over the busy rows (pool.advance: 1 on CPU, 16 on CUDA), then one look at
     which requests finished; they get their result at once.

Every request ends with a result or an exception on its future: its own bad input (caught when it
is submitted), its own failure inside a batch (see "Failure isolation" below), or EngineClosedError.

Failure isolation: one request never fails another. NaN/inf logits are found per row (pool._collect)
and fail their own request. Anything else that fails an encoder micro-batch or the decode steps is
retried: its requests run again one by one through model.generate (the reference a request's tokens
must equal anyway; a sampling request on its own seed), and only a request that fails alone gets an
error. The pool is cleared and the engine goes on serving.

At interpreter exit, every engine still running is stopped (pending requests get EngineClosedError, a
beam-sampling run already going completes) and its thread joined, so a script that never calls
close() exits cleanly instead of tearing down a thread inside torch.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections import deque

import torch

from ..errors import EngineUsageError
from .pool import DecodePool
from .requests import too_many_rows

_RUNNING: set = set()  # schedulers whose thread runs; stopped and joined at interpreter exit
_RUNNING_LOCK = threading.Lock()


@atexit.register
def _stop_all_at_exit():
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for s in running:
        s.stop(drain=False)
    for s in running:
        if s.thread is not threading.current_thread():
            s.thread.join()


class Scheduler:
    def __init__(self, model, max_batch_size: int, max_batch_tokens: int, finish, fail, closed_error,
                 check_every: int | None = None, on_tokens=None):
        """finish(req, rows) and fail(req, exc) settle a request's future (called by the driving
        thread); closed_error() builds the exception pending requests get when the engine closes;
        on_tokens(req, new_rows) takes a streamed request's new tokens (the pool calls it)."""
        self.model, self.max_rows, self.max_tokens = model, max_batch_size, max_batch_tokens
        self.finish, self.fail, self.closed_error = finish, fail, closed_error
        self.min_refill = max(1, max_batch_size // 8)
        self.cv = threading.Condition()  # guards inbox, closing/drain/stopped, drivers
        self.inbox: deque = deque()
        self.closing = self.drain = self.stopped = False
        self.drivers = 0  # threads in drive(): the background thread stands aside
        self.drive_lock = threading.Lock()  # held for a turn: one thread runs the model at a time
        self.waiting: deque = deque()  # continuous-batching requests without a slot yet
        self.static: dict = {}  # static key -> [requests]
        self.pool = DecodePool(model, max_batch_size, max_batch_tokens, check_every, on_tokens)
        self.busy_s = 0.0
        self.static_running = 0  # requests in the static batch now running
        self.turn_thread = None  # the thread inside a turn
        self.turn_started = None  # perf_counter() when the turn now running (with work) began; None between turns
        self.thread = threading.Thread(target=self._run, name="encdec_fast-engine", daemon=True)
        with _RUNNING_LOCK:
            _RUNNING.add(self)
        self.thread.start()

    # -- called from any thread ------------------------------------------------------------------
    def put(self, req) -> bool:
        with self.cv:
            if self.closing:
                return False
            self.inbox.append(req)
            self.cv.notify_all()
        return True

    def stop(self, drain: bool):
        with self.cv:
            if not self.closing:
                self.closing, self.drain = True, drain
            elif not drain:
                self.drain = False  # a later close() without drain cuts a draining shutdown short
            self.cv.notify_all()

    def drive(self, done, first=None):
        """Runs turns in the calling thread until done() (or the engine stops); first() runs once the
        background thread stands aside (submit there, so that it never starts on the work)."""
        if self.turn_thread is threading.current_thread():
            raise EngineUsageError("Engine.generate() was called from a future's done-callback, which runs inside the "
                                   "engine's own turn; wait for results outside the callbacks.")
        with self.cv:
            self.drivers += 1
        try:
            if first is not None:
                first()
            while not done():
                with self.drive_lock:
                    state = self._turn()
                if state == "stop":
                    return
                if state == "idle":
                    with self.cv:
                        if not (self.inbox or self.closing):
                            self.cv.wait(0.05)
        finally:
            with self.cv:
                self.drivers -= 1
                self.cv.notify_all()

    def counts(self) -> tuple[int, int]:
        """(requests waiting to start, requests running): a snapshot, read from any thread."""
        with self.cv:
            inbox = len(self.inbox)
        waiting = inbox + len(self.waiting) + sum(len(g) for g in list(self.static.values()))
        return waiting, len(self.pool.lives) + self.static_running

    # -- turns -------------------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self.inbox or self.waiting or self.static or self.pool.lives)

    def _run(self):
        try:
            while True:
                with self.cv:
                    while not (self.stopped or self.closing or (self.drivers == 0 and self._has_work())):
                        self.cv.wait()
                    if self.stopped:
                        return
                    if self.drivers and not self.closing:
                        continue
                with self.drive_lock:
                    if self._turn() == "stop":
                        return
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(self)

    def _turn(self) -> str:
        """One turn (the caller holds drive_lock): "busy", "idle" (nothing to do) or "stop"."""
        if self.stopped:
            return "stop"
        with self.cv:
            new = list(self.inbox)
            self.inbox.clear()
            closing, drain = self.closing, self.drain
        for r in new:
            if r.static_key is not None:
                self.static.setdefault(r.static_key, []).append(r)
            else:
                self.waiting.append(r)
        if closing and (not drain or not self._has_work()):
            self._fail_all()
            with self.cv:
                self.stopped = True
                self.cv.notify_all()
            return "stop"
        if not self._has_work():
            return "idle"
        t0 = self.turn_started = time.perf_counter()
        self.turn_thread = threading.current_thread()
        try:
            with torch.inference_mode():
                if self.static:
                    self._static_batch()
                self._refill()
                if self.pool.lives:
                    for req, out in self.pool.advance():  # rows, or the request's own NumericalError
                        self.fail(req, out) if isinstance(out, Exception) else self.finish(req, out)
        except Exception:  # noqa: BLE001  failed steps: each request again alone
            with torch.inference_mode():
                self._run_alone(self.pool.clear())
        except BaseException as e:  # an interrupt: fail what was running, and stop
            for r in self.pool.clear():
                self.fail(r, e)
            raise
        finally:
            self.turn_thread = self.turn_started = None
            self.busy_s += time.perf_counter() - t0
        return "busy"

    def _fail_all(self):
        err = self.closed_error()
        pending = self.pool.clear() + list(self.waiting) + [r for rs in self.static.values() for r in rs]
        self.waiting.clear()
        self.static.clear()
        with self.cv:
            pending += list(self.inbox)
            self.inbox.clear()
        for r in pending:
            self.fail(r, err)

    def _refill(self):
        pool = self.pool
        if not self.waiting or pool.free < min(self.min_refill, sum(r.rows for r in self.waiting)):
            return
        take = []
        while self.waiting and pool.reserve(self.waiting[0]):  # in arrival order, as long as rows are free
            r = self.waiting.popleft()
            if not r.future.set_running_or_notify_cancel():
                pool.unreserve(r)
                continue  # cancelled by the caller before it started
            take.append(r)
        if self.waiting and not take and not pool.lives and self.waiting[0].rows > pool.N:
            # cannot happen through Engine.submit (it checks rows <= max_batch_size); never spin on it
            r = self.waiting.popleft()
            self.fail(r, too_many_rows(r, pool.N))
        try:
            failed = pool.admit(take)
        except BaseException as e:  # an interrupt: what did not join the pool is settled here
            for r in take:
                self.fail(r, e)
            raise
        self._run_alone([r for r, _ in failed])  # a failed encoder micro-batch

    def _static_batch(self):
        """The oldest beam-sampling request, alone through model.generate on its seed."""
        key = next(iter(self.static))
        group = self.static.pop(key)
        req, rest = group[0], group[1:]
        if rest:
            self.static[key] = rest
        if req.future.set_running_or_notify_cancel():
            self.static_running = 1
            try:
                self._run_alone([req])
            finally:
                self.static_running = 0

    def _run_alone(self, reqs: list):
        """Requests one by one through model.generate (a sampling one on its seed): beam sampling, and the
        failure isolation of requests that failed together; only a request that fails alone gets an error."""
        model = self.model
        for i, req in enumerate(reqs):
            try:
                ids = torch.tensor([req.ids], dtype=torch.long, device=model.device)
                with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
                    if req.gc.do_sample:
                        torch.manual_seed(req.seed)
                    out = model.generate(ids, generation_config=req.generation_config, **req.kwargs)
                self.finish(req, out.tolist())
            except Exception as e:  # noqa: BLE001  its own error
                self.fail(req, e)
            except BaseException as e:  # an interrupt: nothing left unsettled
                for r in reqs[i:]:
                    self.fail(r, e)
                raise
