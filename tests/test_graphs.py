"""The bucketed static-buffer decode step (decode/state.py), run eagerly on the CPU: padding rows, padded
encoder keys and a larger cache must not change a single token, and nearby shapes share one step.
(On CUDA the same step is captured as a CUDA graph; test_triton_model.py and the benchmarks cover that.)"""

import pytest
import torch
from conftest import hf_model
from test_parity import make_inputs

import encdec_fast
from encdec_fast.decode.state import buckets

pytestmark = pytest.mark.usefixtures("quiet")


def test_buckets_round_rows_to_powers_of_two_and_lengths_to_64():
    assert buckets(1, 1, 1, 1) == (1, 1, 64, 64)
    assert buckets(3, 3, 65, 128) == (4, 4, 128, 128)
    assert buckets(12, 3, 512, 129) == (16, 4, 512, 192)


@pytest.mark.parametrize("enc,dec", [("bert", "gpt2"), ("roberta", "roberta")])
@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3, length_penalty=0.7), dict(num_beams=2, num_return_sequences=2),
                                dict(no_repeat_ngram_size=2, repetition_penalty=1.3)])
def test_static_bucketed_step_gives_transformers_tokens(make_ckpt, enc, dec, kw):
    path = make_ckpt(enc, dec, **({} if dec == "gpt2" else dict(std=0.1)))
    ref = hf_model(path)
    ours = encdec_fast.load(path, device="cpu")
    ours.static_decode = True
    pad = ref.config.encoder.pad_token_id
    ids, mask, _ = make_inputs(3, 11, 1, 97, pad, padded=True, avoid=(pad, ref.config.pad_token_id))
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=9, **kw)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=9, **kw)
    assert torch.equal(got, want), f"\nours {got.tolist()}\ntransformers {want.tolist()}"
    step = next(iter(ours.graph_cache.entries.values()))
    assert step.rows >= got.shape[0] and step.enc_len == 64  # padding really was there


def test_nearby_shapes_share_one_static_step(make_ckpt):
    ours = encdec_fast.load(make_ckpt("bert", "gpt2"), device="cpu")
    ours.static_decode = True
    plain = encdec_fast.load(make_ckpt("bert", "gpt2"), device="cpu")
    for B, S, new in [(3, 11, 5), (4, 30, 7), (3, 64, 9), (2, 5, 6)]:
        ids, mask, _ = make_inputs(B, S, 1, 97, 0, padded=True)
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new)
        assert torch.equal(got, plain.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new))
    assert ours.graph_cache.captures == 2  # (4 rows, 64 keys, 64 slots) for the first three, (2, ...) for the last
