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


@pytest.mark.parametrize("kw,match", [
    (dict(labels=torch.tensor([[5, 500]])), "labels hold 500, neither a token id in \\[0, 97\\) nor -100"),
    (dict(labels=torch.tensor([[5, -7]])), "labels hold -7"),
    (dict(labels=torch.tensor([5, 6])), "labels must be a non-empty 2-D"),
    (dict(labels=torch.tensor([[5.0, 6.0]])), "labels must hold integer token ids"),
    (dict(labels=torch.tensor([[5, 6], [7, 8]])), "labels has batch 2 but the encoder input has 1"),
    (dict(labels=torch.ones(1, 129, dtype=torch.long)), "labels have length 129"),
    (dict(labels=torch.tensor([[5, 6]]), decoder_input_ids=torch.tensor([[3, 5, 6]])), "labels have shape \\(1, 2\\)"),
    (dict(attention_mask=torch.tensor([[1, 0.5, 1, 1]])), "must hold 0 \\(padding\\) and 1"),
    (dict(decoder_input_ids=torch.ones(1, 2, dtype=torch.long), decoder_attention_mask=torch.tensor([[2, 1]])),
     "decoder_attention_mask must hold 0"),
    (dict(decoder_input_ids="3 5 6"), "decoder_input_ids is a string"),
])
def test_bad_forward_arguments_raise_invalid_input(model, kw, match):
    with pytest.raises(InvalidInputError, match=match):
        model(torch.tensor([[5, 6, 7, 8]]), **kw)


@pytest.mark.parametrize("enc,match", [
    ((torch.zeros(1, 3, 17),), "width 32|\\(batch, source length, 32\\)"),
    (torch.zeros(3, 32), "got torch.float32 \\(3, 32\\)"),
    ((torch.zeros(1, 3, 32, dtype=torch.long),), "floating"),
    ("encoded", "got str"),
])
def test_bad_encoder_outputs_raise_invalid_input(model, enc, match):
    with pytest.raises(InvalidInputError, match=match):
        model(encoder_outputs=enc, decoder_input_ids=torch.ones(1, 2, dtype=torch.long))


def test_encoder_outputs_in_every_accepted_form_give_the_same_logits(model):
    ids, dec = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[3, 9, 10]])
    full = model(ids, decoder_input_ids=dec)
    for enc in (full.encoder_last_hidden_state, (full.encoder_last_hidden_state,), full):
        enc = enc if not hasattr(enc, "encoder_last_hidden_state") else (enc.encoder_last_hidden_state,)
        assert torch.equal(model(encoder_outputs=enc, decoder_input_ids=dec).logits, full.logits)


def test_labels_need_valid_special_ids_in_the_config(model):
    saved = model.config.decoder_start_token_id
    model.config.decoder_start_token_id = 500
    try:
        with pytest.raises(InvalidInputError, match="config.decoder_start_token_id=500 is outside"):
            model(torch.tensor([[5, 6]]), labels=torch.tensor([[5, 6]]))
    finally:
        model.config.decoder_start_token_id = saved


@pytest.mark.parametrize("kw,cls,match", [
    (dict(path=5), InvalidInputError, "path must be a folder path \\(a str or os.PathLike\\), got int 5"),
    (dict(path=None, encoder=["a"], decoder="b"), InvalidInputError, "encoder must be a folder path"),
    (dict(seed="x"), InvalidInputError, "seed must be an int"),
    (dict(check_finite="yes"), InvalidInputError, "check_finite must be True or False"),
    (dict(device=5.5), InvalidInputError, "is not a torch device"),
    (dict(dtype="float8"), InvalidInputError, "is not a torch dtype"),
    (dict(dtype=torch.int8), UnsupportedArgumentError, "is not supported"),  # a dtype, just not one we run
    (dict(encoder="enc", decoder="dec"), InvalidInputError, "not both"),
    (dict(path=None, encoder="enc"), InvalidInputError, "needs both encoder= and decoder="),
])
def test_bad_load_arguments_raise_one_clear_error(ckpt, kw, cls, match):
    kw = {"path": ckpt, **kw}
    with pytest.raises(cls, match=match):
        encdec_fast.load(kw.pop("path"), **kw)
