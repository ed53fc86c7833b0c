"""The engine's scheduler: whoever holds its drive lock runs the model, one turn at a time.

Two kinds of thread drive it: its own background thread (always there; it serves submit()), and a
thread blocked in Engine.generate(), which runs the turns itself while it waits, the background
thread standing aside. The reason is the CPU: once two threads have run OpenMP parallel regions,
libgomp throttles its spin-waiting and every torch op pays a thread wake-up (measured: a decode loop
from a second thread runs 2x slower on 2 cores than from the thread that loaded the model). Either
way exactly one thread touches the model at a time.

Each turn:
  1. take the newly submitted requests (beam-search ones go to the static queue, the others wait for
     decode slots);
  2. run one static batch of beam-search requests, if any wait: requests with the same resolved
     generation settings, sorted by source length and batched through model.generate (this pauses the
     decode slots while it runs);
  3. refill free decode slots (continuous batching): waiting requests join in arrival order once a
     few slots are free (or all the waiting ones fit), encoded in micro-batches of similar length;
  4. one decode step over the busy slots; finished requests get their result at once.

Every request ends with a result or an exception on its future: its own bad input (caught when it
is submitted), a failure of the micro-batch/step/static batch it was in, or EngineClosedError.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import torch

from .pool import DecodePool, length_chunks, pad_batch


class Scheduler:
    def __init__(self, model, max_batch_size: int, max_batch_tokens: int, finish, fail, closed_error, on_tokens):
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
        self.pool = DecodePool(model, max_batch_size, max_batch_tokens, on_tokens)
        self.busy_s = 0.0
        self.static_running = 0  # requests in the static batch now running
        self.turn_thread = None  # the thread inside a turn
        self.thread = threading.Thread(target=self._run, name="encdec_fast-engine", daemon=True)
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
            raise RuntimeError("Engine.generate() was called from a future's done-callback, which runs inside the "
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
        t0 = time.perf_counter()
        self.turn_thread = threading.current_thread()
        try:
            with torch.inference_mode():
                if self.static:
                    self._static_batch()
                self._refill()
                if self.pool.lives:
                    for req, rows in self.pool.step():
                        self.finish(req, rows)
        except BaseException as e:  # noqa: BLE001  a bug, out-of-memory, an interrupt: fail what was running
            for r in self.pool.clear():
                self.fail(r, e)
            if not isinstance(e, Exception):
                raise
        finally:
            self.turn_thread = None
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
        pool, free = self.pool, self.pool.free
        if not self.waiting or free < min(self.min_refill, sum(r.rows for r in self.waiting)):
            return
        take = []
        while self.waiting and self.waiting[0].rows <= free:
            r = self.waiting.popleft()
            if not r.future.set_running_or_notify_cancel():
                continue  # cancelled by the caller before it started
            take.append(r)
            free -= r.rows
        if self.waiting and not take and not pool.lives and self.waiting[0].rows > pool.N:
            # cannot happen through Engine.submit (it checks rows <= max_batch_size); never spin on it
            r = self.waiting.popleft()
            self.fail(r, RuntimeError(f"request needs {r.rows} decode slots, the engine has {pool.N}"))
        for r, e in pool.admit(take):
            self.fail(r, e)

    def _static_batch(self):
        """One batch of the oldest static group through model.generate (beam search)."""
        key = next(iter(self.static))
        group = self.static.pop(key)
        req0 = group[0]
        if req0.gc.do_sample:  # beam sampling: each request alone, on its own seed
            batch, rest = [req0], group[1:]
        else:
            per_row = max(req0.gc.num_beams or 1, req0.rows)
            chunks = length_chunks(group, lambda r: len(r.ids), self.max_tokens * per_row, self.max_rows,
                                   rows=lambda r: per_row)
            batch = chunks[0]
            rest = [r for c in chunks[1:] for r in c]
        if rest:
            self.static[key] = rest  # goes back at the end of the line: groups take turns
        batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not batch:
            return
        self.static_running = len(batch)
        try:
            self._run_static(batch)
        except Exception as e:  # noqa: BLE001
            if len(batch) == 1:
                self.fail(batch[0], e)
                return
            for r in batch:  # isolate the culprit: each alone
                try:
                    self._run_static([r])
                except Exception as e1:  # noqa: BLE001
                    self.fail(r, e1)
        finally:
            self.static_running = 0

    def _run_static(self, batch: list):
        model, req0 = self.model, batch[0]
        ids, mask = pad_batch([r.ids for r in batch], model.cfg.encoder.pad_token_id or 0, model.device)
        kwargs = dict(req0.kwargs)
        if req0.gc.do_sample:
            with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
                torch.manual_seed(req0.seed)
                out = model.generate(ids, attention_mask=mask, generation_config=req0.generation_config, **kwargs)
        else:
            out = model.generate(ids, attention_mask=mask, generation_config=req0.generation_config, **kwargs)
        R = req0.gc.num_return_sequences or 1
        out = out.view(len(batch), R, -1).tolist()
        for r, rows in zip(batch, out):
            self.finish(r, _strip(rows, r.eos_set))


def _strip(rows: list[list[int]], eos: set) -> list[list[int]]:
    """One input's rows of a padded beam-search batch, cut to the length generating it alone gives:
    a hypothesis ends at its first eos after the decoder start, else it ran to the batch's full length."""
    def length(row):
        if eos:
            for j in range(1, len(row)):
                if row[j] in eos:
                    return j + 1
        return len(row)

    n = max(length(row) for row in rows)
    return [row[:n] for row in rows]
