"""bf16 models on CPUs with AMX run their encoder-side products (the encoder, enc_to_dec_proj, the cross-attention K/V
projections) through oneDNN's bf16 matmul, the decode step on the CPU kernels (cpu/weights.py). The project's machines
have no AMX, so the route is forced here (ENCDEC_CPU_ENCODER=onednn; oneDNN then runs AVX512-BF16 code): which
weights it moves, that it computes what the kernels route computes (up to oneDNN's bf16 rounding of its outputs),
that the model still moves and casts, and the error for a bad setting. Its quality gate: tests/test_quality.py."""

import pytest
import torch
from conftest import right_padded

import encdec_fast
from encdec_fast import InvalidInputError
from encdec_fast.cpu import kernels as ck
from encdec_fast.cpu import weights as lowp

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only path"),
    pytest.mark.skipif(not ck.has_bf16(), reason="the CPU kernels' bf16 products need AVX512-BF16"),
    pytest.mark.usefixtures("quiet"),
]


@pytest.mark.parametrize("dec", ["gpt2", "bert"])
def test_the_route_moves_the_encoder_side_products_and_computes_the_same(make_ckpt, monkeypatch, dec):
    path = make_ckpt("bert", dec, enc_hidden=48, dec_hidden=64, heads=4, vocab=131, std=0.05)
    ids, mask = right_padded(131, [9, 4, 13])
    kw = dict(attention_mask=mask, max_new_tokens=6, output_logits=True, return_dict_in_generate=True)
    monkeypatch.setenv("ENCDEC_CPU_ENCODER", "kernels")
    ref = encdec_fast.load(path, dtype=torch.bfloat16)
    monkeypatch.setenv("ENCDEC_CPU_ENCODER", "onednn")
    m = encdec_fast.load(path, dtype=torch.bfloat16)
    moved = {n for n, mod in m.net.named_modules() if getattr(mod, "weight", None) is not None
             and isinstance(mod.weight, torch.Tensor) and mod.weight.is_mkldnn}
    assert moved == set(lowp.encoder_slots(m.net)) and "enc_to_dec_proj" in moved  # 48 -> 64 wide
    assert all(n.startswith("encoder.") or n == "enc_to_dec_proj" or n.endswith(".cross.kv") for n in moved)
    assert type(m.net.decoder.layers[0].attn.qkv.weight) is lowp.PackedWeight
    assert not any(getattr(mod, "weight", torch.empty(0)).is_mkldnn for mod in ref.net.modules()
                   if isinstance(getattr(mod, "weight", None), torch.Tensor))
    enc_ref = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :3]).logits
    enc_got = m(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :3]).logits
    torch.testing.assert_close(enc_got, enc_ref, rtol=0, atol=0.05 * enc_ref.abs().max().item())
    a, b = m.generate(ids, **kw), ref.generate(ids, **kw)
    assert a.sequences.shape == b.sequences.shape
    torch.testing.assert_close(a.logits[0], b.logits[0], rtol=0, atol=0.05 * b.logits[0].abs().max().item())


def test_the_route_survives_moves_and_casts(make_ckpt, monkeypatch):
    monkeypatch.setenv("ENCDEC_CPU_ENCODER", "onednn")
    path = make_ckpt("bert", "gpt2", enc_hidden=32, heads=2, vocab=97)
    ids, mask = right_padded(97, [7, 5])
    m = encdec_fast.load(path, dtype=torch.bfloat16)
    first = m.generate(ids, attention_mask=mask, max_new_tokens=4)
    m.to(torch.float32)  # fp32: no route (every weight on the kernels' fp32 layout)
    assert not m.net.encoder.layers[0].attn.qkv.weight.is_mkldnn
    fp32 = encdec_fast.load(path)
    assert torch.equal(m.generate(ids, attention_mask=mask, max_new_tokens=4),
                       fp32.generate(ids, attention_mask=mask, max_new_tokens=4))
    m.to(torch.bfloat16)
    assert m.net.encoder.layers[0].attn.qkv.weight.is_mkldnn
    assert torch.equal(m.generate(ids, attention_mask=mask, max_new_tokens=4), first)


def test_a_bad_route_setting_is_one_clear_error(make_ckpt, monkeypatch):
    path = make_ckpt("bert", "gpt2", enc_hidden=32, heads=2, vocab=97)
    monkeypatch.setenv("ENCDEC_CPU_ENCODER", "amx")
    with pytest.raises(InvalidInputError, match="ENCDEC_CPU_ENCODER='amx' is not a route.*auto, onednn, kernels"):
        encdec_fast.load(path, dtype=torch.bfloat16)
    monkeypatch.setenv("ENCDEC_CPU_ENCODER", "auto")  # this machine has no AMX: the kernels route
    m = encdec_fast.load(path, dtype=torch.bfloat16)
    assert m.net.encoder.layers[0].attn.qkv.weight.is_mkldnn == lowp.has_amx()
