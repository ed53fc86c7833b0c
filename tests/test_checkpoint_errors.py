"""Damaged checkpoints: malformed metadata (shard index, .bin contents, config.json and
generation_config.json fields) and bad weights (integer dtypes, NaN/inf, float16 overflow) each raise
one clear error naming the file or tensor and the field, never a raw Python error or silent garbage."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import encdec_fast
from encdec_fast import CheckpointError, InvalidInputError, NumericalError

W = "decoder.transformer.h.0.mlp.c_fc.weight"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from conftest import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("ckerr"), "bert", "gpt2", layers=1)


def copy(ckpt, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(ckpt, dst)
    return dst


def _weights(d, fn):
    sd = load_file(str(d / "model.safetensors"))
    fn(sd)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


def _sharded(d, edit):
    """The weights as one shard plus an index; edit(index, state dict, folder) damages them."""
    sd = load_file(str(d / "model.safetensors"))
    os.remove(d / "model.safetensors")
    save_file(sd, str(d / "s1.safetensors"), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: "s1.safetensors" for k in sd}}
    edit(index, sd, d)
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _first(index):
    return next(iter(index["weight_map"]))


def _drop_from_shard(index, sd, d):
    sd = dict(sd)
    sd.pop(_first(index))
    save_file(sd, str(d / "s1.safetensors"), metadata={"format": "pt"})


def _bin(d, obj):
    sd = load_file(str(d / "model.safetensors"))
    os.remove(d / "model.safetensors")
    torch.save(obj(sd), str(d / "pytorch_model.bin"))


def _json_edit(name, fn):
    def edit(d):
        raw = json.loads((d / name).read_text())
        fn(raw)
        (d / name).write_text(json.dumps(raw))
    return edit


def cfg(fn):
    return _json_edit("config.json", fn)


def gen(fn):
    return _json_edit("generation_config.json", fn)


METADATA = [
    ("index weight_map is a list", lambda d: _sharded(d, lambda i, sd, d: i.update(weight_map=list(i["weight_map"]))),
     "index.json': weight_map must be a JSON object"),
    ("index entry is null", lambda d: _sharded(d, lambda i, sd, d: i["weight_map"].update({_first(i): None})),
     "= None is not the name of a shard file"),
    ("index entry leaves the folder", lambda d: _sharded(d, lambda i, sd, d: i["weight_map"].update({_first(i): "../x"})),
     "is not the name of a shard file"),
    ("shard lacks a tensor the index names", lambda d: _sharded(d, _drop_from_shard), "which does not hold them"),
    ("index is not JSON", lambda d: _sharded(d, lambda i, sd, d: None) or (d / "model.safetensors.index.json").write_text("{"),
     "index.json' is not valid JSON"),
    (".bin holds a list", lambda d: _bin(d, lambda sd: list(sd.values())), "holds a list, not a state dict"),
    (".bin holds non-tensor values", lambda d: _bin(d, lambda sd: {k: v.tolist() for k, v in sd.items()}),
     "to a list, not a tensor"),
    ("num_attention_heads 0", cfg(lambda c: c["encoder"].update(num_attention_heads=0)),
     "config.json': encoder.num_attention_heads must be an int >= 1, got 0"),
    ("num_attention_heads 'two'", cfg(lambda c: c["encoder"].update(num_attention_heads="two")),
     "encoder.num_attention_heads must be an int >= 1, got 'two'"),
    ("negative n_positions", cfg(lambda c: c["decoder"].update(n_positions=-5)), "decoder.n_positions must be an int >= 1"),
    ("float n_head", cfg(lambda c: c["decoder"].update(n_head=2.0)), "decoder.n_head must be an int >= 1, got 2.0"),
    ("string layer_norm_eps", cfg(lambda c: c["encoder"].update(layer_norm_eps="x")), "encoder.layer_norm_eps must be a number > 0"),
    ("decoder config is a list", cfg(lambda c: c.update(decoder=[1])), "decoder must be a JSON object"),
    ("string decoder_start_token_id", cfg(lambda c: c.update(decoder_start_token_id="x")), "decoder_start_token_id must be an int"),
    ("null vocab_size", cfg(lambda c: c["decoder"].update(vocab_size=None)), "vocab_size"),
    ("config.json is a list", lambda d: (d / "config.json").write_text("[1, 2]"), "config.json' must hold a JSON object"),
    ("config.json is not JSON", lambda d: (d / "config.json").write_text("{"), "config.json' is not valid JSON"),
    ("generation num_beams 'four'", gen(lambda c: c.update(num_beams="four")),
     "generation_config.json': num_beams must be an int >= 1, got 'four'"),
    ("generation temperature 'hot'", gen(lambda c: c.update(temperature="hot")), "temperature must be a number >= 0"),
    ("generation max_length 2.5", gen(lambda c: c.update(max_length=2.5)), "max_length must be an int >= 1, got 2.5"),
    ("generation_config.json is a list", lambda d: (d / "generation_config.json").write_text("[1]"), "must hold a JSON object"),
]


@pytest.mark.parametrize("damage,match", [m[1:] for m in METADATA], ids=[m[0] for m in METADATA])
def test_malformed_metadata_raises_a_checkpoint_error_naming_file_and_field(ckpt, tmp_path, damage, match):
    d = copy(ckpt, tmp_path)
    damage(d)
    with pytest.raises(CheckpointError) as e:
        encdec_fast.load(d)
    assert match in str(e.value), str(e.value)
    assert str(d) in str(e.value) or "tensor" in str(e.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_integer_weights_are_refused_naming_the_tensor(ckpt, tmp_path, dtype):
    d = copy(ckpt, tmp_path)
    _weights(d, lambda sd: sd.update({W: sd[W].to(dtype)}))
    with pytest.raises(CheckpointError, match=f"tensor {W} is stored as {dtype}"):
        encdec_fast.load(d)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_unless_the_check_is_off(ckpt, tmp_path, value):
    d = copy(ckpt, tmp_path)
    _weights(d, lambda sd: sd[W].__setitem__((0, 0), value))
    with pytest.raises(CheckpointError, match=f"tensor {W} holds NaN or inf"):
        encdec_fast.load(d)
    model = encdec_fast.load(d, check_finite=False)  # loads; its non-finite logits then fail generate()
    with pytest.raises(NumericalError, match="NaN or inf logits"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3)


def test_weights_beyond_float16_are_refused_when_loading_in_float16(ckpt, tmp_path):
    d = copy(ckpt, tmp_path)
    _weights(d, lambda sd: sd[W].__setitem__((0, 0), 1e6))
    with pytest.raises(InvalidInputError, match=f"tensor {W} holds values up to 1e\\+06, beyond the range of torch.float16"):
        encdec_fast.load(d, dtype=torch.float16)
    encdec_fast.load(d, dtype=torch.float32)  # fine in float32


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the captured CUDA step and multinomial's device-side assert need a GPU"))])
def test_float16_overflow_at_run_time_is_a_numerical_error_not_junk_tokens(ckpt, tmp_path, device):
    """The final layer norm scaled so that the logits exceed float16's range (65504): float32 generates,
    float16 raises NumericalError (transformers would emit whatever argmax picks among inf/NaN), in
    generate() and per request in the Engine, and the process stays usable (on CUDA: no device-side
    assert from torch.multinomial)."""
    d = copy(ckpt, tmp_path)
    _weights(d, lambda sd: sd["decoder.transformer.ln_f.weight"].mul_(3e4))
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    fp32 = encdec_fast.load(d, device=device, dtype=torch.float32)
    want = fp32.generate(ids, max_new_tokens=4)
    assert want.shape == (2, 5) and float(fp32(ids, decoder_input_ids=want).logits.abs().max()) > 65504
    fp16 = encdec_fast.load(d, device=device, dtype=torch.float16)
    for kw in (dict(), dict(num_beams=2), dict(do_sample=True), dict(num_beams=2, do_sample=True)):
        with pytest.raises(NumericalError, match="float16 overflow"):
            fp16.generate(ids, max_new_tokens=4, **kw)
    with encdec_fast.Engine(fp16) as engine:
        out = engine.generate([[5, 6, 7]] * 4, return_exceptions=True, max_new_tokens=4,
                              request_kwargs=[{}, dict(do_sample=True, seed=1), dict(num_beams=2),
                                              dict(num_beams=2, do_sample=True, seed=2)])
    assert all(isinstance(r, NumericalError) for r in out), out
    assert torch.equal(fp32.generate(ids, max_new_tokens=4), want)  # the process (its CUDA context) still works
