"""The engine's scheduler: whoever holds its drive lock runs the model, one turn at a time.

Two kinds of thread drive it: its own background thread (always there; it serves submit()), and a
thread blocked in Engine.generate(), which runs the turns itself while it waits, the background
thread standing aside. The reason is the CPU: once two threads have run OpenMP parallel regions,
libgomp throttles its spin-waiting and every torch op pays a thread wake-up (measured: a decode loop
from a second thread runs 2x slower on 2 cores than from the thread that loaded the model). Either
way exactly one thread touches the model at a time.

The scheduler decides, the pool (pool.py) executes: the scheduler owns the decode rows (which are
free, which request holds which) and the queue of requests waiting for rows. Each turn:
  1. take the newly submitted requests into the waiting queue;
  2. refill free decode rows (continuous batching): waiting requests take rows in arrival order once a
     few rows are free (or all the waiting ones fit), and join the pool, encoded in micro-batches of
     similar length;
  3. a few decode steps over the busy rows (pool.advance: 1 on CPU, 16 on CUDA), then one look at
     which requests finished (or were cancelled); they get their result at once and their rows are free.

Every request ends with a result or an exception on its future: its own bad input (caught when it
is submitted), its own failure inside a batch (see "Failure isolation" below), or EngineClosedError.

Failure isolation: one request never fails another. NaN/inf logits are found per row (pool._collect)
and fail their own request. Anything else that fails an encoder micro-batch or the decode steps is
retried: its requests run again one by one through model.generate (the reference a request's tokens
must equal anyway; a sampling request on its own seed), and only a request that fails alone gets an
error. The pool is cleared and the engine goes on serving.

At interpreter exit, every engine still running is stopped (pending requests get EngineClosedError) and
its thread joined, so a script that never calls
close() exits cleanly instead of tearing down a thread inside torch.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections import deque

import torch

from ..decode import search
from ..errors import EngineUsageError
from .pool import DecodePool

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
        """finish(req, rows, lengths=None) and fail(req, exc) settle a request's future (called by the driving
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
        self.waiting: deque = deque()  # requests without rows yet, in arrival order
        self.free_rows = set(range(max_batch_size))  # decode rows no request holds
        self.pool = DecodePool(model, max_batch_size, max_batch_tokens, check_every, on_tokens,
                               on_free=self.free_rows.update)
        self.busy_s = 0.0
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
        return inbox + len(self.waiting), len(self.pool.lives)

    # -- turns -------------------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self.inbox or self.waiting or self.pool.lives)

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
        self.waiting.extend(new)
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
                self._refill()
                if self.pool.lives:
                    for req, out in self.pool.advance():  # (rows, lengths), or the request's own NumericalError
                        self.fail(req, out) if isinstance(out, Exception) else self.finish(req, *out)
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
        pending = self.pool.clear() + list(self.waiting)
        self.waiting.clear()
        with self.cv:
            pending += list(self.inbox)
            self.inbox.clear()
        for r in pending:
            self.fail(r, err)

    # -- decode rows -------------------------------------------------------------------------------
    def _rows_for(self, req) -> list[int] | None:
        """Free rows for req: any req.rows rows; beam search an aligned block of num_beams rows (its slot
        of decode/beam.py's layout). None: not enough free now."""
        nb = req.params.num_beams
        if nb == 1:
            return sorted(self.free_rows)[:req.rows] if req.rows <= len(self.free_rows) else None
        for slot in range(self.max_rows // nb):
            block = list(range(slot * nb, (slot + 1) * nb))
            if self.free_rows.issuperset(block):
                return block
        return None

    def _refill(self):
        waiting = self.waiting
        if not waiting or len(self.free_rows) < min(self.min_refill, sum(r.rows for r in waiting)):
            return
        taken = []
        while waiting:  # in arrival order, as long as rows are free
            rows = self._rows_for(waiting[0])
            if rows is None:
                break
            r = waiting.popleft()
            if not r.future.set_running_or_notify_cancel():
                continue  # cancelled by the caller before it started
            self.free_rows.difference_update(rows)
            taken.append((r, rows))
        try:
            failed = self.pool.admit(taken)
        except BaseException as e:  # an interrupt: what did not join the pool is settled here
            for r, rows in taken:
                self.fail(r, e)
            raise
        held = {id(r): rows for r, rows in taken}
        for r, _ in failed:
            self.free_rows.update(held[id(r)])
        self._run_alone([r for r, _ in failed])  # a failed encoder micro-batch

    def _run_alone(self, reqs: list):
        """Requests one by one through generate() (a sampling one on its seed): the failure isolation of
        requests that failed together; only a request that fails alone gets an error."""
        model = self.model
        for i, req in enumerate(reqs):
            try:
                ids = torch.tensor([req.ids], dtype=torch.long, device=model.device)
                with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
                    if req.params.do_sample:
                        torch.manual_seed(req.seed)
                    out = search.run(model, ids, None, req.params)
                self.finish(req, out.tolist())
            except Exception as e:  # noqa: BLE001  its own error
                self.fail(req, e)
            except BaseException as e:  # an interrupt: nothing left unsettled
                for r in reqs[i:]:
                    self.fail(r, e)
                raise
