"""Packed projection weights on the CPU: oneDNN's layout (encdec_fast/prepack.py; the fp32 default where the CPU
kernels cannot run) and the CPU kernels' (cpu/weights.py; the fp32 default where they can): the packed linear ops
against F.linear on awkward shapes, pack/unpack round trips (sharing kept), and whole models: packed either way and
plain give transformers' tokens, and moving a model unpacks and repacks it."""

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_model

import encdec_fast
from encdec_fast import ops, prepack
from encdec_fast.cpu import weights as lowp
from encdec_fast.errors import InvalidInputError


@pytest.fixture
def onednn(monkeypatch):
    """fp32 models load oneDNN's layout (as where the CPU kernels cannot run)."""
    monkeypatch.setattr(lowp, "f32_applies", lambda *a: False)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only path (the GPU runs the triton table)")


def _packed(w):
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 8)


def test_this_build_has_onednn():
    # the CPU wheels CI installs are built with oneDNN: if this fails, the packed path silently is not tested
    assert prepack.available()


@pytest.mark.parametrize("rows,k,n", [(1, 7, 5), (3, 33, 130), (8, 96, 300), (17, 64, 1), (0, 16, 9)])
def test_packed_linear_ops_equal_plain(rows, k, n):
    g = torch.Generator().manual_seed(rows * 100 + k)
    x = torch.randn(rows, k, generator=g)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    r = torch.randn(rows, n, generator=g)
    lnx = (torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g), 1e-5)
    lnr = (torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g), 1e-12)
    p = _packed(w)
    close = dict(rtol=1e-5, atol=1e-4)
    packed = prepack.TABLE  # the packed table against the torch reference on the plain weight
    torch.testing.assert_close(packed.linear(x, p, b), F.linear(x, w, b), **close)
    torch.testing.assert_close(packed.linear(x, p, None), F.linear(x, w), **close)
    for approx in ("none", "tanh"):
        torch.testing.assert_close(packed.linear_gelu(x, p, b, approx), ops.linear_gelu(x, w, b, approx), **close)
    for kw in (dict(x_ln=lnx), dict(x_ln=lnx, gelu="tanh"), dict(residual=r), dict(residual=r, residual_ln=lnr),
               dict(x_ln=lnx, residual=r, residual_ln=lnr), dict(x_ln=lnx, gelu="none")):
        torch.testing.assert_close(packed.fused_linear(x, p, b, **kw), ops.fused_linear(x, w, b, **kw), **close)
        # a plain weight given to the packed table runs the reference
        assert torch.equal(packed.fused_linear(x, w, b, **kw), ops.fused_linear(x, w, b, **kw))


def test_packed_linear_takes_3d_and_strided_inputs():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    x3 = torch.randn(2, 5, 24, generator=g)
    xs = torch.randn(5, 48, generator=g)[:, ::2]  # a strided view
    p = _packed(w)
    torch.testing.assert_close(prepack.TABLE.linear(x3, p, b), F.linear(x3, w, b), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(prepack.TABLE.linear(xs, p, b), F.linear(xs, w, b), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="gelu and residual"):
        prepack.TABLE.fused_linear(xs, p, b, gelu="tanh", residual=torch.zeros(5, 40))


def test_pack_unpack_round_trip_keeps_sharing(make_ckpt):
    path = make_ckpt("bert", "bert", enc_kw=dict(), dec_kw=dict())
    m = encdec_fast.load(path, prepack=False)
    before = {n: b.clone() for n, b in m.net.named_buffers() if b is not None}
    dec = m.net.decoder
    assert dec.head.weight is dec.embed.word  # tied: one tensor
    m.net.encoder.layers[0].mlp.fc2._buffers["weight"] = m.net.decoder.layers[0].mlp.fc2.weight  # shared
    before["encoder.layers.0.mlp.fc2.weight"] = before["decoder.layers.0.mlp.fc2.weight"]
    prepack.pack(m.net)
    assert prepack.is_packed(m.net)
    assert dec.head.weight.is_mkldnn and not dec.embed.word.is_mkldnn  # the lookup reads the plain table
    assert m.net.encoder.layers[0].mlp.fc2.weight is m.net.decoder.layers[0].mlp.fc2.weight
    prepack.pack(m.net)  # idempotent
    prepack.unpack(m.net)
    assert not prepack.is_packed(m.net)
    assert dec.head.weight is dec.embed.word  # tied again
    assert m.net.encoder.layers[0].mlp.fc2.weight is m.net.decoder.layers[0].mlp.fc2.weight
    after = dict(m.net.named_buffers(remove_duplicate=False))
    for n, b in before.items():
        assert torch.equal(after[n], b), n


def test_fp32_default_is_the_cpu_kernels_layout(make_ckpt):
    m = encdec_fast.load(make_ckpt())
    if not lowp.f32_applies(m.device, m.dtype, m.backend):
        pytest.skip("the CPU kernels cannot run here: oneDNN's layout is the default (the next test)")
    w = m.net.decoder.layers[0].mlp.fc1.weight
    assert isinstance(w, lowp.PackedWeight) and w.packed and w.dtype == torch.float32 and m.ops is lowp.TABLE
    assert not prepack.is_packed(m.net)


def test_load_packs_on_cpu_fp32_and_bf16(make_ckpt, onednn):
    path = make_ckpt()
    packed, plain = encdec_fast.load(path), encdec_fast.load(path, prepack=False)
    assert prepack.is_packed(packed.net) and packed.ops is prepack.TABLE  # packed weights run on their own table
    assert not prepack.is_packed(plain.net) and plain.ops is ops.TORCH
    bf16 = encdec_fast.load(path, dtype=torch.bfloat16)  # the CPU's bf16 kernels, else oneDNN's bf16 layout
    assert lowp.is_packed(bf16.net) or prepack.is_packed(bf16.net) == prepack.available(torch.bfloat16)
    assert not prepack.is_packed(encdec_fast.load(path, dtype=torch.float16).net)  # oneDNN's fp16 is not packed
    assert not prepack.is_packed(encdec_fast.load(path, backend="triton").net)  # the kernels read plain memory
    with pytest.raises(InvalidInputError, match="prepack"):
        encdec_fast.load(path, prepack="yes")


@pytest.mark.parametrize("pair", [("bert", "gpt2"), ("roberta", "bert"), ("bert-generation", "bert-generation")])
def test_packed_and_plain_give_transformers_tokens(make_ckpt, quiet, pair, monkeypatch):
    path = make_ckpt(*pair)
    hf = hf_model(path)
    kernels = encdec_fast.load(path)  # the CPU kernels' fp32 layout where they run
    with monkeypatch.context() as mp:
        mp.setattr(lowp, "f32_applies", lambda *a: False)
        packed = encdec_fast.load(path)
    plain = encdec_fast.load(path, prepack=False)
    assert prepack.is_packed(packed.net)
    ids = torch.tensor([[5, 9, 14, 22, 7, 31, 12], [6, 18, 4, 11, 0, 0, 0]])
    mask = (torch.arange(7) < torch.tensor([[7], [4]])).long()
    for kw in (dict(max_new_tokens=9), dict(max_new_tokens=7, num_beams=3)):
        ref = hf.generate(ids, attention_mask=mask, **kw)
        assert torch.equal(packed.generate(ids, attention_mask=mask, **kw), ref), kw
        assert torch.equal(plain.generate(ids, attention_mask=mask, **kw), ref), kw
        assert torch.equal(kernels.generate(ids, attention_mask=mask, **kw), ref), kw
    dec = torch.tensor([[3, 8, 15, 9], [3, 1, 2, 4]])
    want = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    for m in (packed, kernels):
        torch.testing.assert_close(m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, want,
                                   rtol=1e-4, atol=1e-4)


def test_to_unpacks_and_repacks(make_ckpt, quiet, onednn):
    path = make_ckpt()
    m = encdec_fast.load(path)
    ids = torch.tensor([[5, 9, 14, 22, 7]])
    want = m.generate(ids, max_new_tokens=6)
    m.to(dtype=torch.float16)
    assert not prepack.is_packed(m.net) and m.dtype == torch.float16
    m.to(dtype=torch.bfloat16)
    assert (lowp.is_packed(m.net) or prepack.is_packed(m.net) == prepack.available(torch.bfloat16)) and m.dtype == torch.bfloat16
    m.to(dtype=torch.float32)  # a round trip through fp16: not the same weights, but packed again
    assert prepack.is_packed(m.net)
    m2 = encdec_fast.load(path)
    m2.to("cpu")
    assert prepack.is_packed(m2.net)
    assert torch.equal(m2.generate(ids, max_new_tokens=6), want)
