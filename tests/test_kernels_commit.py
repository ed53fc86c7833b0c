"""Triton commit kernel (a decode step's bookkeeping in one launch) vs the torch reference
(encdec_fast.decode.ops.commit_tokens), element for element, on random decode states with every kind of row:
idle, running, finished by eos, at their limit, beam rows with and without their request done."""

import pytest
import torch
from kernel_checks import DEVICE

from encdec_fast.decode import ops as dops
from encdec_fast.kernels import commit as kcommit


def _state(N, Lc, E, seed):
    g = torch.Generator().manual_seed(seed)

    def ints(lo, hi, shape=(N,)):
        return torch.randint(lo, hi, shape, generator=g)

    def flags(p=0.5):
        return torch.rand(N, generator=g) < p

    t = ints(1, Lc + 1)
    limit = torch.minimum(t + ints(0, 3), torch.full((N,), Lc))  # some rows at their limit
    stop = torch.where(flags(0.3), t, 0)
    eos = torch.where(torch.rand(N, E, generator=g) < 0.7, ints(0, 9, (N, E)), -1)
    s = dict(tokens=ints(0, 9), seq=ints(0, 9, (N, Lc)), t=t, limit=limit, alive=flags(0.7), busy=flags(0.8),
             is_beam=flags(0.2), beam_done=flags(0.5), stop_t=stop, pad=ints(0, 9), eos=eos,
             steps=torch.tensor(int(ints(0, 5, (1,)))), all_stopped_at=torch.tensor(0))
    return {k: v.to(DEVICE) for k, v in s.items()}


@pytest.mark.parametrize("N, Lc, E", [(1, 1, 1), (1, 5, 2), (7, 9, 1), (33, 17, 3), (130, 40, 5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_commit_kernel_matches_reference(N, Lc, E, seed):
    ref, got = _state(N, Lc, E, seed), _state(N, Lc, E, seed)
    dops.commit_tokens(**ref)
    kcommit.commit_tokens(**got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k} differs (N={N}, Lc={Lc}, E={E}, seed={seed})"


def test_commit_counts_the_step_when_every_busy_row_has_stopped():
    s = _state(4, 6, 1, 0)
    s["busy"][:] = torch.tensor([True, True, False, False])
    s["stop_t"][:] = torch.tensor([3, 0, 0, 0])
    s["t"][:] = torch.tensor([3, 5, 1, 1])
    s["limit"][:] = torch.tensor([6, 6, 6, 6])
    s["alive"][:] = torch.tensor([False, True, False, False])
    s["is_beam"][:] = False
    s["eos"][:] = 7
    s["tokens"][:] = torch.tensor([1, 7, 1, 1])  # row 1 hits eos now: every busy row has stopped
    s["steps"].fill_(4)
    s["all_stopped_at"].fill_(0)
    kcommit.commit_tokens(**s)
    assert int(s["steps"]) == 5 and int(s["all_stopped_at"]) == 5
    assert s["stop_t"].tolist() == [3, 6, 0, 0] and s["seq"][1, 5] == 7


def test_commit_kernel_rejects_bad_inputs():
    s = _state(3, 4, 1, 0)
    with pytest.raises(ValueError, match="tokens"):
        kcommit.commit_tokens(**(s | {"tokens": s["tokens"].int()}))
    with pytest.raises(ValueError, match="alive"):
        kcommit.commit_tokens(**(s | {"alive": s["alive"][:2]}))
