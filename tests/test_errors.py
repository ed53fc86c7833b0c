"""Every error a user can cause raises one encdec_fast exception naming the cause and the fix."""

import json
import os
import shutil

import pytest
import torch

import encdec_fast
from encdec_fast import (
    CheckpointError,
    CheckpointNotFoundError,
    InvalidInputError,
    UnsupportedArgumentError,
    UnsupportedModelError,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from conftest import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("err"), "bert", "gpt2", layers=1)


@pytest.fixture(scope="module")
def model(ckpt):
    return encdec_fast.load(ckpt)


def copy(ckpt, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(ckpt, dst)
    return dst


def test_missing_folder_raises_not_found(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist") as e:
        encdec_fast.load(tmp_path / "nope")
    assert isinstance(e.value, FileNotFoundError)


def test_folder_without_config_raises_not_found(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        encdec_fast.load(tmp_path)


def test_folder_without_weights_raises_not_found(ckpt, tmp_path):
    d = copy(ckpt, tmp_path)
    os.remove(d / "model.safetensors")
    with pytest.raises(CheckpointNotFoundError, match="holds no weights"):
        encdec_fast.load(d)


def _rewrite_weights(d, fn):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "model.safetensors"))
    fn(sd)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(ckpt, tmp_path):
    d = copy(ckpt, tmp_path)
    _rewrite_weights(d, lambda sd: sd.pop("decoder.transformer.h.0.attn.c_attn.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['decoder.transformer.h.0.attn.c_attn.weight'\]"):
        encdec_fast.load(d)


def test_extra_tensor_is_named(ckpt, tmp_path):
    d = copy(ckpt, tmp_path)
    _rewrite_weights(d, lambda sd: sd.__setitem__("decoder.transformer.h.9.attn.c_attn.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        encdec_fast.load(d)


def test_shape_mismatch_is_named(ckpt, tmp_path):
    d = copy(ckpt, tmp_path)
    _rewrite_weights(d, lambda sd: sd.__setitem__("encoder.encoder.layer.0.output.dense.bias", torch.zeros(5)))
    with pytest.raises(CheckpointError, match="shape"):
        encdec_fast.load(d)


def test_corrupt_weights_file(ckpt, tmp_path):
    d = copy(ckpt, tmp_path)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        encdec_fast.load(d)


def _edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_native_seq2seq_folder_is_refused(tmp_path, model_type):
    import transformers as T

    cfg = T.AutoConfig.for_model(model_type)
    cfg.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="not an EncoderDecoderModel"):
        encdec_fast.load(tmp_path)


@pytest.mark.parametrize("role,model_type,match", [
    ("decoder", "gpt_neo", r"decoder model_type 'gpt_neo' is not supported; supported decoders: bert, roberta, "
                           r"xlm-roberta, camembert, bert-generation, electra, gpt2, bart"),
    ("decoder", "prophetnet", "n-gram streams"),
    ("encoder", "albert", r"encoder model_type 'albert' is not supported; supported encoders: bert, roberta, xlm-roberta"),
    ("encoder", "gpt2", "supported encoders"),
])
def test_unsupported_model_type_is_refused_naming_it_and_what_is_supported(ckpt, tmp_path, role, model_type, match):
    d = copy(ckpt, tmp_path)
    _edit_config(d, lambda c: c[role].update(model_type=model_type))
    with pytest.raises(UnsupportedModelError, match=match):
        encdec_fast.load(d)


@pytest.mark.parametrize("fam", ["bert-generation", "electra", "xlm-roberta"])
def test_relative_position_embeddings_are_refused(tmp_path, fam):
    from conftest import build_checkpoint

    d = build_checkpoint(tmp_path / fam, fam, fam, layers=1)
    _edit_config(d, lambda c: c["decoder"].update(position_embedding_type="relative_key_query"))
    with pytest.raises(UnsupportedModelError, match="relative position embeddings"):
        encdec_fast.load(d)


def test_a_whole_bart_model_as_glued_decoder_is_refused(tmp_path):
    import transformers as T
    from conftest import half_config

    T.BertModel(half_config("bert", hidden=32, layers=1, heads=2, vocab=97, decoder=False)).save_pretrained(tmp_path / "e")
    T.BartForConditionalGeneration(half_config("bart", hidden=32, layers=1, heads=2, vocab=97, decoder=False)).save_pretrained(
        tmp_path / "d")
    with pytest.raises(UnsupportedModelError, match="whole BART model"):
        encdec_fast.load(encoder=tmp_path / "e", decoder=tmp_path / "d")


def test_from_transformers_refuses_other_models():
    import transformers as T
    from conftest import half_config

    with pytest.raises(UnsupportedModelError, match="takes a transformers EncoderDecoderModel, got BertModel"):
        encdec_fast.from_transformers(T.BertModel(half_config("bert", hidden=32, layers=1, heads=2, vocab=97, decoder=False)))


def test_legacy_bin_holding_code_is_refused_without_running_it(ckpt, tmp_path):
    """weights_only=True stays for the legacy format that cannot be memory-mapped: a pickle that would
    run code is an error, and the code never runs."""
    d = copy(ckpt, tmp_path)
    os.remove(d / "model.safetensors")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"encoder.embeddings.word_embeddings.weight": Payload()}, d / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="cannot read weights file"):
        encdec_fast.load(d)
    assert not marker.exists()


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["encoder"].update(hidden_act="silu"), "activation 'silu'"),
    (lambda c: c["encoder"].update(position_embedding_type="relative_key"), "position_embedding_type"),
    (lambda c: c["decoder"].update(add_cross_attention=False), "add_cross_attention"),
])
def test_unsupported_option_is_refused(ckpt, tmp_path, edit, match):
    d = copy(ckpt, tmp_path)
    _edit_config(d, edit)
    with pytest.raises(UnsupportedModelError, match=match):
        encdec_fast.load(d)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without CUDA")
def test_cuda_device_without_cuda_is_refused(ckpt, model):
    with pytest.raises(UnsupportedArgumentError, match="no CUDA"):
        encdec_fast.load(ckpt, device="cuda")
    with pytest.raises(UnsupportedArgumentError, match="no CUDA"):
        model.to("cuda")


def test_unknown_backend_and_dtype(ckpt):
    with pytest.raises(UnsupportedArgumentError, match="backend"):
        encdec_fast.load(ckpt, backend="tensorrt")
    with pytest.raises(UnsupportedArgumentError, match="dtype"):
        encdec_fast.load(ckpt, dtype=torch.int8)
    with pytest.raises(UnsupportedArgumentError, match="cpu' and 'cuda"):
        encdec_fast.load(ckpt, device="meta")


@pytest.mark.parametrize("ids,match", [
    (torch.zeros(0, 5, dtype=torch.long), "empty"),
    (torch.zeros(2, 0, dtype=torch.long), "empty"),
    (torch.zeros(2, 5), "integer token ids"),
    (torch.tensor([[1, 2, 97]]), "token id 97"),
    (torch.tensor([[1, -3, 4]]), "token id -3"),
    (torch.tensor([1, 2, 3]), "2-D"),
    (torch.ones(1, 131, dtype=torch.long), "at most 130"),
])
def test_bad_input_ids(model, ids, match):
    with pytest.raises(InvalidInputError, match=match):
        model(ids, decoder_input_ids=torch.ones(max(ids.shape[0], 1), 2, dtype=torch.long))


def test_decoder_input_too_long_and_mask_mismatch(model):
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(InvalidInputError, match="decoder_input_ids has length 129"):
        model(ids, decoder_input_ids=torch.ones(1, 129, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="shape"):
        model(ids, attention_mask=torch.ones(1, 3), decoder_input_ids=ids)
    with pytest.raises(InvalidInputError, match="masks every token"):
        model(ids, attention_mask=torch.zeros(1, 4), decoder_input_ids=ids)


@pytest.mark.parametrize("types,match", [
    (torch.full((1, 4), 2), r"outside \[0, 2\)"),
    (torch.zeros(1, 3, dtype=torch.long), "shape"),
    (torch.zeros(1, 4), "integers"),
])
def test_bad_token_type_ids(model, types, match):
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(InvalidInputError, match=match):
        model(ids, token_type_ids=types, decoder_input_ids=ids)
    with pytest.raises(InvalidInputError, match=match):
        model.generate(ids, token_type_ids=types, max_new_tokens=2)


def test_engine_refuses_token_type_ids_per_request(model):
    with encdec_fast.Engine(model) as engine:
        with pytest.raises(UnsupportedArgumentError, match="token_type_ids"):
            engine.submit([5, 6, 7], token_type_ids=[0, 1, 0]).result()


def test_unsupported_forward_argument(model):
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(UnsupportedArgumentError, match="inputs_embeds"):
        model(ids, decoder_input_ids=ids, inputs_embeds=torch.zeros(1, 4, 32))
    with pytest.raises(UnsupportedArgumentError):
        model(ids, decoder_input_ids=ids, output_attentions=True)


def test_all_errors_share_one_base_class():
    for cls in (CheckpointError, CheckpointNotFoundError, InvalidInputError, UnsupportedArgumentError, UnsupportedModelError):
        assert issubclass(cls, encdec_fast.EncDecError)
