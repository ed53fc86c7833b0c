"""load(quantize="int8") and load(dtype=torch.bfloat16) on the CPU (encdec_fast/cpu/): what gets converted, the op
table, outputs close to fp32's, every generation mode and the Engine running on them, rows computed alike
whatever batch they are in, and one clear error for every option that cannot go with them."""

import pytest
import torch
from conftest import hf_model, solo

import encdec_fast
from encdec_fast import InvalidInputError, UnsupportedArgumentError, ops, prepack
from encdec_fast.cpu import kernels as ck
from encdec_fast.cpu import weights as lowp

pytestmark = [pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only path"), pytest.mark.usefixtures("quiet")]

IDS = torch.tensor([[5, 9, 14, 22, 7, 31, 12], [6, 18, 4, 11, 0, 0, 0]])
MASK = (torch.arange(7) < torch.tensor([[7], [4]])).long()
DEC = torch.tensor([[3, 8, 15, 9, 40], [3, 1, 2, 4, 60]])


@pytest.fixture(scope="module")
def path(make_ckpt):
    return make_ckpt("bert", "gpt2", std=0.1)


def _logits(m):
    return m(input_ids=IDS, attention_mask=MASK, decoder_input_ids=DEC).logits


def test_int8_converts_every_projection_and_the_head(path):
    m = encdec_fast.load(path, quantize="int8")
    assert m.quantize == "int8" and m.ops is lowp.TABLE and m.dtype == torch.bfloat16  # the rest stored in bf16
    slots = list(lowp._slots(m.net))
    assert slots and all(isinstance(s.weight, lowp.PackedWeight) and s.weight.is_int8 for s in slots)
    assert m.net.decoder.head.weight.shape == m.net.decoder.embed.word.shape  # the tied head: its own int8 copy
    assert type(m.net.decoder.embed.word) is torch.Tensor and m.net.decoder.embed.word.dtype == torch.bfloat16
    assert encdec_fast.load(path, quantize="int8", dtype="float32").dtype == torch.float32
    assert all(b.dtype == torch.float32 for n, b in m.net.named_buffers() if n.endswith("bias"))
    assert lowp.is_int8(m.net) and not prepack.is_packed(m.net)


@pytest.mark.parametrize("kw", [dict(quantize="int8"), dict(dtype=torch.bfloat16),
                                dict(quantize="int8", dtype=torch.float32)], ids=["int8", "bf16", "int8+fp32"])
def test_low_precision_logits_are_fp32_and_close_to_fp32(path, kw):
    ref = _logits(encdec_fast.load(path))
    m = encdec_fast.load(path, **kw)
    if kw.get("dtype") == torch.bfloat16:
        assert m.dtype == torch.bfloat16  # what the embeddings and the K/V cache are stored in
        if "quantize" not in kw:
            assert m.ops is (lowp.TABLE if ck.has_bf16() else prepack.TABLE)
    got = _logits(m)
    assert got.dtype == torch.float32 or not ck.has_bf16()
    err = (got.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.03, f"max relative error {err:.4f}"
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


def test_from_transformers_quantizes_like_load(path):
    a = _logits(encdec_fast.load(path, quantize="int8"))
    b = _logits(encdec_fast.from_transformers(hf_model(path), quantize="int8"))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [dict(quantize="int8"), dict(dtype=torch.bfloat16)], ids=["int8", "bf16"])
def test_every_generation_mode_runs_and_rows_do_not_depend_on_their_batch(path, kw):
    """Each activation row is quantised (int8) or rounded (bf16) on its own, and the kernels sum each row in the
    same order whatever the rows beside it: a row's tokens are the same alone and in a batch."""
    m = encdec_fast.load(path, **kw)
    for gen in (dict(max_new_tokens=9), dict(max_new_tokens=7, num_beams=3), dict(max_new_tokens=6, num_beams=2,
                                                                                   num_return_sequences=2)):
        both = m.generate(IDS, attention_mask=MASK, **gen)
        per_row = len(both) // 2
        for b in range(2):
            alone = m.generate(IDS[b:b + 1, :int(MASK[b].sum())], **gen)
            got = both[b * per_row:(b + 1) * per_row]
            assert torch.equal(got[:, :alone.shape[1]], alone), (gen, b)
    torch.manual_seed(0)
    s1 = m.generate(IDS, attention_mask=MASK, do_sample=True, top_k=5, max_new_tokens=6)
    torch.manual_seed(0)
    assert torch.equal(m.generate(IDS, attention_mask=MASK, do_sample=True, top_k=5, max_new_tokens=6), s1)


def test_engine_requests_equal_generate_alone(path):
    m = encdec_fast.load(path, quantize="int8")
    inputs = [[5, 9, 14], [6, 18, 4, 11, 40, 41], [7], [30, 31, 32, 33]]
    with encdec_fast.Engine(m, max_batch_size=3) as engine:
        results = engine.generate(inputs, max_new_tokens=8)
    for x, r in zip(inputs, results):
        assert [r.output_ids] == solo(m, x, max_new_tokens=8)


def test_bf16_model_moves_and_repacks(path):
    m = encdec_fast.load(path, dtype=torch.bfloat16)
    want = m.generate(IDS, attention_mask=MASK, max_new_tokens=6)
    m.to(dtype=torch.float32)  # the fp32 default: the CPU kernels' fp32 layout (oneDNN's without them)
    assert m.dtype == torch.float32 and m.ops is (lowp.TABLE if ck.has_int8() else prepack.TABLE)
    m.to(dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16 and m.ops is (lowp.TABLE if ck.has_bf16() else prepack.TABLE)
    assert torch.equal(m.generate(IDS, attention_mask=MASK, max_new_tokens=6), want)  # bf16 -> fp32 -> bf16 is exact


def test_int8_model_refuses_to_move(path):
    m = encdec_fast.load(path, quantize="int8")
    assert m.to("cpu") is m and m.to(dtype=torch.bfloat16) is m  # nothing to do
    for kw in (dict(dtype=torch.float32), dict(dtype="float16")):
        with pytest.raises(UnsupportedArgumentError, match="quantize='int8'.*load the\\s+checkpoint again|Load the"):
            m.to(**kw)
    with pytest.raises(UnsupportedArgumentError, match="packed int8 weight"):
        m.net.decoder.head.weight.float()


@pytest.mark.parametrize("kw,cls,match", [
    (dict(quantize="int4"), UnsupportedArgumentError, "quantize='int4' is not supported.*'int8'"),
    (dict(quantize="INT8"), UnsupportedArgumentError, "is not supported"),
    (dict(quantize=8), InvalidInputError, "quantize=8 is not a mode"),
    (dict(quantize=True), InvalidInputError, "not a mode"),
    (dict(quantize="int8", dtype=torch.float16), UnsupportedArgumentError, "dtype=torch.float16 cannot go with it"),
    (dict(quantize="int8", prepack=False), InvalidInputError, "prepack=False"),
])
def test_bad_quantize_arguments_raise_one_clear_error(path, kw, cls, match):
    with pytest.raises(cls, match=match):
        encdec_fast.load(path, **kw)


def test_quantize_errors_come_before_reading_the_checkpoint(tmp_path):
    missing = tmp_path / "nothing here"
    with pytest.raises(UnsupportedArgumentError, match="int4"):
        encdec_fast.load(missing, quantize="int4")
    with pytest.raises(UnsupportedArgumentError, match="float16"):
        encdec_fast.from_transformers(object(), quantize="int8", dtype="float16")


def test_prepack_false_keeps_bf16_plain(path):
    m = encdec_fast.load(path, dtype=torch.bfloat16, prepack=False)
    assert not lowp.is_packed(m.net) and not prepack.is_packed(m.net) and m.ops is ops.TORCH


def test_int8_on_the_triton_backend_reads_int8_weights_in_the_fused_linear(path):
    """load(quantize="int8") on the triton backend (CUDA's; here Triton's interpreter): plain int8 weights with
    their scales, every projection through kernels/linear.py's w8a16 path, logits close to the CPU int8 model's."""
    from encdec_fast import quantize

    m = encdec_fast.load(path, quantize="int8", backend="triton")
    assert m.ops is quantize.triton_int8_table() and m.dtype == torch.float32  # the stored dtype (fp32 here)
    w = m.net.decoder.layers[0].attn.qkv.weight
    assert isinstance(w, lowp.PackedWeight) and not w.packed and w.values.dtype == torch.int8
    ref = _logits(encdec_fast.load(path, quantize="int8", dtype=torch.float32))
    got = _logits(m)
    assert (got - ref).abs().max() / ref.abs().max() < 2e-3  # the CPU's int16 activations vs fp32 ones
    out = m.generate(IDS, attention_mask=MASK, max_new_tokens=5)
    assert out.shape[0] == 2
