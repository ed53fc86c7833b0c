"""How a decode step runs: captured as a CUDA graph and replayed, or eagerly over the rows in use.

A StepRunner owns one DecodeState and runs decode/step.py's forward and commit on it:

  captured (CUDA)   the step is captured once per (plan, cache prefix moved, state epoch) and replayed:
                    the whole step when nothing is drawn on the host (plan.host_free), else forward alone,
                    the caller's draws and commit running eagerly after the replay. A warm-up on a side
                    stream comes first (Triton compiles there); it runs the step for real, so the small
                    state is saved and restored around it, and it moves no beam cache.
  eager, trimmed    (the CPU) rows past the highest busy one and token slots past the longest row are left
                    out (the state's host bounds), so that an idle tail costs nothing.
  eager, graph-shaped  every row over the whole buffers, as a captured step runs (model.graph_shapes:
                    how the CPU tests exercise the CUDA path's shapes; and on CUDA a plan with `host`,
                    whose StepHooks run the caller's functions inside the step).

Beam search moves caches physically: a step copies the filled prefix of the beam rows (as far as the
host knows it); a captured step rounds it up to a multiple of 64 slots (one graph each).

StateCache keeps a few runners per model, keyed by shape bucket, so that generate() calls of nearby
shapes reuse one state and its captured steps.
"""

from __future__ import annotations

import time

import torch

from . import step as step_fn
from .state import DecodeState
from .step import StepPlan

SEQ_BUCKET = 64


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round(n: int, m: int) -> int:
    return -(-n // m) * m


def buckets(rows: int, enc_tokens: int, seq_len: int) -> tuple[int, int, int]:
    """Rows to a power of two; packed encoder tokens and token slots to multiples of 64."""
    return _pow2(rows), _round(enc_tokens, SEQ_BUCKET), _round(seq_len, SEQ_BUCKET)


class StepRunner:
    """Runs steps over `state` (see the module docstring). capture: CUDA graphs (CUDA only);
    graph_shaped: eager steps over the whole buffers instead of the rows and slots in use."""

    def __init__(self, state: DecodeState, *, capture: bool = False, graph_shaped: bool = False):
        self.state = state
        self.capture = capture and state.device.type == "cuda"
        self.graph_shaped = self.capture or graph_shaped
        self.graphs: dict = {}
        self.epoch = state.epoch
        self.captures, self.capture_seconds = 0, 0.0
        self.last: step_fn.StepOutput | None = None  # the last step's logits and scores

    def step(self, plan: StepPlan, *, choose=None, draws=(), hooks: step_fn.StepHooks | None = None
             ) -> step_fn.StepOutput:
        """One step. choose: for a plan with `sample`, a function scores -> the plain rows' tokens, run
        between forward and commit; draws: beam sampling's [(group, slots, generator)]; hooks: a plan with
        `host` gets them (that step runs eagerly). Returns the step's output (its scores are the processed
        ones when plan.processed)."""
        st = self.state
        move = st.filled if plan.beams else None
        if move is not None and self.graph_shaped:
            move = min(_round(move, SEQ_BUCKET), st.seq_cap)
        if not self.capture or plan.host:
            extent = None if self.graph_shaped else (st.row_extent, st.filled)
            out = step_fn.forward(st, plan, extent, hooks)
            step_fn.commit(st, plan, out, choose(out.scores) if choose is not None else None, draws=draws,
                           move_length=move, hooks=hooks)
        else:
            if st.epoch != self.epoch:  # a buffer was reallocated: every graph reads stale addresses
                self.graphs.clear()
                self.epoch = st.epoch
            key = (plan, move)
            entry = self.graphs.get(key) or self._capture(key, plan, move)
            graph, out = entry
            graph.replay()
            if not plan.host_free:
                step_fn.commit(st, plan, out, choose(out.scores) if choose is not None else None, draws=draws,
                               move_length=move)
        st.advanced()
        self.last = out
        return out

    def _capture(self, key, plan: StepPlan, move: int | None):
        """Captures forward (+ commit when the plan draws nothing on the host); see the module docstring."""
        t0 = time.perf_counter()
        st = self.state
        saved = self._snapshot()
        s = torch.cuda.Stream(device=st.device)
        s.wait_stream(torch.cuda.current_stream(st.device))
        with torch.cuda.stream(s):
            for _ in range(2):
                out = step_fn.forward(st, plan)
                if plan.host_free:
                    step_fn.commit(st, plan, out, move_caches=False)
                self._restore(saved)
        torch.cuda.current_stream(st.device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step_fn.forward(st, plan)
            if plan.host_free:
                step_fn.commit(st, plan, out, move_length=move)
        entry = self.graphs[key] = (graph, out)
        self.captures += 1
        self.capture_seconds += time.perf_counter() - t0
        return entry

    def _snapshot(self):
        st = self.state
        bufs = [st.seq, st.t, st.stop_t, st.alive, st.nonfinite, st.steps, st.all_stopped_at]
        if st.tables.seen is not None:
            bufs.append(st.tables.seen)
        for g in st.live_groups:
            bufs += [g.running_scores, g.beam_scores, g.finished, g.open, g.done, g.hyps, g.running_bidx,
                     g.beam_indices]
        return [(b, b.clone()) for b in bufs]

    @staticmethod
    def _restore(saved):
        for b, copy in saved:
            b.copy_(copy)


class StateCache:
    """A few runners (each with its decode state) per model, keyed by shape bucket, least recently used
    evicted first: a captured step is reused by later generate() calls of nearby shapes."""

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self.entries: dict = {}
        self.created = 0

    @property
    def captures(self) -> int:
        return sum(r.captures for r in self.entries.values())

    @property
    def capture_seconds(self) -> float:
        return sum(r.capture_seconds for r in self.entries.values())

    def get(self, model, rows: int, enc_tokens: int, seq_len: int, capture: bool) -> StepRunner:
        key = (*buckets(rows, enc_tokens, seq_len), model.dtype, model.backend, capture)
        runner = self.entries.pop(key, None)
        if runner is None:
            while len(self.entries) >= self.max_entries:
                self.entries.pop(next(iter(self.entries)))
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
            N, Tc, Lc = key[:3]
            runner = StepRunner(DecodeState(model, N, Lc, 1, Tc), capture=capture, graph_shaped=True)
            self.created += 1
        else:
            runner.state.clear()
        self.entries[key] = runner
        return runner
