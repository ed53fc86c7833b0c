"""The bucketed, graph-shaped decode step (decode/runner.py), run eagerly on the CPU: padding rows, padded
encoder keys and a larger cache must not change a single token, and nearby shapes share one step.
(On CUDA the same step is captured as a CUDA graph; test_triton_model.py and the benchmarks cover that.)"""

import pytest
import torch
from conftest import beam_sampling_draws, hf_model
from test_parity import make_inputs

import encdec_fast
from encdec_fast.decode.runner import buckets

pytestmark = pytest.mark.usefixtures("quiet")


def test_buckets_round_rows_to_powers_of_two_and_lengths_to_64():
    assert buckets(1, 1, 1) == (1, 64, 64)
    assert buckets(3, 65, 128) == (4, 128, 128)
    assert buckets(12, 512, 129) == (16, 512, 192)


@pytest.mark.parametrize("enc,dec", [("bert", "gpt2"), ("roberta", "roberta")])
@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3, length_penalty=0.7), dict(num_beams=2, num_return_sequences=2),
                                dict(no_repeat_ngram_size=2, repetition_penalty=1.3)])
def test_graph_shaped_bucketed_step_gives_transformers_tokens(make_ckpt, enc, dec, kw):
    path = make_ckpt(enc, dec, **({} if dec == "gpt2" else dict(std=0.1)))
    ref = hf_model(path)
    ours = encdec_fast.load(path, device="cpu")
    ours.graph_shapes = True
    pad = ref.config.encoder.pad_token_id
    ids, mask, _ = make_inputs(3, 11, 1, 97, pad, padded=True, avoid=(pad, ref.config.pad_token_id))
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=9, **kw)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=9, **kw)
    assert torch.equal(got, want), f"\nours {got.tolist()}\ntransformers {want.tolist()}"
    state = next(iter(ours.state_cache.entries.values())).state
    assert state.rows >= got.shape[0] and state.enc_cap == 64  # padding really was there (the arena holds 3 x <= 11 tokens)


def test_nearby_shapes_share_one_graph_shaped_step(make_ckpt):
    ours = encdec_fast.load(make_ckpt("bert", "gpt2"), device="cpu")
    ours.graph_shapes = True
    plain = encdec_fast.load(make_ckpt("bert", "gpt2"), device="cpu")
    for B, S, new in [(3, 11, 5), (4, 15, 7), (3, 21, 9), (2, 5, 6), (3, 60, 5)]:
        ids, mask, _ = make_inputs(B, S, 1, 97, 0, padded=True)
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new)
        assert torch.equal(got, plain.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new))
    # (4 rows, 64 arena tokens, 64 slots) for the first three, (2, 64, 64), then (4, 128, 64): the
    # packed sources (at most 33, 60, 63, 10 and 120 real tokens) pick the arena bucket
    assert ours.state_cache.created == 3


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, top_k=5),
                                pytest.param(dict(do_sample=True, num_beams=2, top_k=10), marks=beam_sampling_draws)])
def test_late_host_checks_return_what_transformers_returns(make_ckpt, kw):
    """The GPU default looks at the finished flags every 16 steps: the steps run past the end must not
    change the output (sequences, lengths, scores)."""
    path = make_ckpt("bert", "gpt2")
    ref = hf_model(path)
    ours = encdec_fast.load(path, device="cpu")
    ours.graph_shapes = True
    ids, mask, _ = make_inputs(3, 9, 1, 97, 0, padded=True)
    kw = dict(max_new_tokens=30, return_dict_in_generate=True, output_scores=True) | kw
    with torch.no_grad():  # an eos that the rows reach at different steps, well before 30
        kw["eos_token_id"] = int(ref.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None)[1, 6])
        torch.manual_seed(0)
        want = ref.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(0)
    got = ours.generate(ids, attention_mask=mask, stop_check_every=16, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.scores) == len(want.scores) < 30  # it did stop early, after eos
    for a, b in zip(got.scores, want.scores):
        assert torch.equal(torch.isinf(a), torch.isinf(b)) and (a - b).nan_to_num(0, 0, 0).abs().max() < 1e-4


def _addresses(state) -> dict:
    """Every state tensor's storage: the decode state's, its tables', its beam groups'."""
    out = {}
    for owner, obj in [("state", state), ("tables", state.tables)] + [(f"group{k}", g) for k, g in state.groups.items()]:
        for name, v in vars(obj).items():
            if isinstance(v, torch.Tensor) and name not in ("scores", "logits"):
                out[f"{owner}.{name}"] = v.data_ptr()
    out["cache"] = state.cache.buf.data_ptr()
    return out


def test_a_step_updates_every_state_tensor_in_place(make_ckpt, monkeypatch):
    """A captured step replays on the addresses it was captured with: a step that rebinds a state tensor
    (x = torch.where(...) instead of x.copy_(...)) would make the next replay read stale values."""
    from encdec_fast.decode.runner import StepRunner

    ours = encdec_fast.load(make_ckpt("bert", "gpt2"), device="cpu")
    ours.graph_shapes = True
    moved = []
    step = StepRunner.step

    def checked(self, plan, **kw):
        before = _addresses(self.state)
        out = step(self, plan, **kw)
        after = _addresses(self.state)
        moved.extend(k for k in before if after.get(k) != before[k])
        return out

    monkeypatch.setattr(StepRunner, "step", checked)
    ids, mask, _ = make_inputs(3, 9, 1, 97, 0, padded=True)
    for kw in (dict(num_beams=2, repetition_penalty=1.3), dict(no_repeat_ngram_size=2, bad_words_ids=[[5, 6]]),
               dict(num_beams=3, num_return_sequences=2, length_penalty=0.5)):
        ours.generate(ids, attention_mask=mask, max_new_tokens=6, **kw)
    assert not moved, f"rebound during a step: {sorted(set(moved))}"
