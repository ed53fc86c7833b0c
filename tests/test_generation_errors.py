"""generate() refuses what it does not implement (UnsupportedArgumentError naming the argument) and bad
input (InvalidInputError naming the cause), before any work is done."""

import warnings

import pytest
import torch
from transformers import GenerationConfig

import encdec_fast
from encdec_fast import InvalidInputError, UnsupportedArgumentError


@pytest.fixture(scope="module")
def model(make_ckpt):
    return encdec_fast.load(make_ckpt("bert", "gpt2"), device="cpu")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


IDS = torch.tensor([[5, 6, 7], [8, 9, 10]])


@pytest.mark.parametrize("kw,name", [
    (dict(num_beams=4, num_beam_groups=2, diversity_penalty=0.5), "num_beam_groups"),
    (dict(num_beams=2, constraints=["x"]), "constraints"),
    (dict(force_words_ids=[[5]]), "force_words_ids"),
    (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha"),
    (dict(assistant_model=object()), "assistant_model"),
    (dict(prefix_allowed_tokens_fn=lambda b, i: [5]), "prefix_allowed_tokens_fn"),
    (dict(output_attentions=True, return_dict_in_generate=True), "output_attentions"),
    (dict(output_hidden_states=True), "output_hidden_states"),
    (dict(do_sample=True, typical_p=0.5), "typical_p"),
    (dict(do_sample=True, min_p=0.1), "min_p"),
    (dict(forced_bos_token_id=2), "forced_bos_token_id"),
    (dict(suppress_tokens=[4]), "suppress_tokens"),
    (dict(encoder_no_repeat_ngram_size=2), "encoder_no_repeat_ngram_size"),
    (dict(decoder_attention_mask=torch.ones(2, 1)), "decoder_attention_mask"),
    (dict(num_beamz=3), "num_beamz"),  # a typo is an unknown argument
    (dict(negative_prompt_ids=torch.ones(2, 2, dtype=torch.long)), "negative_prompt_ids"),
])
def test_unsupported_argument_is_refused_by_name(model, kw, name):
    with pytest.raises(UnsupportedArgumentError, match=name):
        model.generate(IDS, max_new_tokens=3, **kw)


def test_unsupported_option_in_a_generation_config_is_refused(model):
    with pytest.raises(UnsupportedArgumentError, match="renormalize_logits"):
        model.generate(IDS, generation_config=GenerationConfig(renormalize_logits=True, max_new_tokens=3))
    with pytest.raises(InvalidInputError, match="GenerationConfig"):  # a wrong type, not a missing feature
        model.generate(IDS, generation_config={"max_new_tokens": 3})


def test_options_at_their_off_values_are_accepted(model):
    out = model.generate(IDS, max_new_tokens=3, num_beam_groups=1, output_attentions=False, typical_p=1.0,
                         logits_processor=None, streamer=None, synced_gpus=False, use_cache=True)
    assert out.shape == (2, 4)


@pytest.mark.parametrize("ids,match", [
    (torch.zeros(0, 4, dtype=torch.long), "empty"),
    (torch.zeros(2, 0, dtype=torch.long), "empty"),
    (torch.tensor([[5, 97]]), "outside the vocabulary"),
    (torch.tensor([[5, -1]]), "outside the vocabulary"),
    (torch.full((1, 131), 5), "positions for at most"),
    (torch.tensor([[0.5, 1.0]]), "integer"),
    (None, "required"),
])
def test_bad_input_ids_raise_invalid_input(model, ids, match):
    with pytest.raises(InvalidInputError, match=match):
        model.generate(ids, max_new_tokens=3)


def test_bad_attention_mask_raises_invalid_input(model):
    with pytest.raises(InvalidInputError, match="shape"):
        model.generate(IDS, attention_mask=torch.ones(2, 5), max_new_tokens=3)
    with pytest.raises(InvalidInputError, match="masks every token"):
        model.generate(IDS, attention_mask=torch.tensor([[1, 1, 0], [0, 0, 0]]), max_new_tokens=3)


def test_length_past_the_decoder_positions_raises_invalid_input(model):
    positions = model.cfg.decoder.max_length  # 128 for this gpt2 decoder
    assert model.generate(IDS[:1], max_new_tokens=positions).shape[1] <= positions + 1  # the limit itself is fine
    with pytest.raises(InvalidInputError, match="decoder positions"):
        model.generate(IDS, max_new_tokens=positions + 1)
    with pytest.raises(InvalidInputError, match="decoder positions"):
        model.generate(IDS, max_length=positions + 5)


def test_prefix_not_shorter_than_max_length_raises_invalid_input(model):
    with pytest.raises(InvalidInputError, match="max_length"):
        model.generate(IDS, decoder_input_ids=torch.tensor([[3, 5, 6], [3, 7, 8]]), max_length=3)
    with pytest.raises(InvalidInputError, match="decoder_input_ids has batch"):
        model.generate(IDS, decoder_input_ids=torch.tensor([[3, 5]]), max_new_tokens=3)
    with pytest.raises(InvalidInputError, match="decoder_input_ids holds token id"):
        model.generate(IDS, decoder_input_ids=torch.tensor([[3, 500], [3, 5]]), max_new_tokens=3)


def test_missing_decoder_start_raises_invalid_input(model):
    with pytest.raises(InvalidInputError, match="decoder_start_token_id"):
        model.generate(IDS, max_new_tokens=3, decoder_start_token_id=None, bos_token_id=None)


@pytest.mark.parametrize("kw", [
    dict(max_new_tokens=0),
    dict(early_stopping="sometimes", num_beams=2),
    dict(num_beams=2, num_return_sequences=3),
    dict(num_return_sequences=2),  # greedy cannot return several sequences
    dict(do_sample=True, temperature=0.0),
    dict(do_sample=True, top_k=-2),
    dict(repetition_penalty=0.0),
    dict(bad_words_ids=[5, 6]),
    dict(bad_words_ids=[[500]]),
    dict(eos_token_id="x"),
])
def test_invalid_generation_values_raise_invalid_input(model, kw):
    with pytest.raises(InvalidInputError):
        model.generate(IDS, **({"max_new_tokens": 3} | kw))


@pytest.mark.parametrize("kw,words", [
    # ran silently before: negative ids index the embedding from its end and come out as -1 tokens
    (dict(decoder_start_token_id=-1), "decoder_start_token_id=-1 is outside the decoder's vocabulary [0, 97)"),
    (dict(decoder_start_token_id=97), "decoder_start_token_id=97 is outside"),
    (dict(decoder_start_token_id=[3, 500]), "decoder_start_token_id=500 is outside"),
    (dict(pad_token_id=-1), "pad_token_id=-1 is outside"),
    (dict(pad_token_id=200, eos_token_id=[9]), "pad_token_id=200 is outside"),
    (dict(pad_token_id=None, eos_token_id=[500, 9]), "pad_token_id (unset, so eos_token_id[0])=500 is outside"),
    (dict(num_beams=0), "num_beams must be an int >= 1, got 0"),  # ran greedy before
    (dict(eos_token_id=-1), "eos_token_id holds -1"),
    # reached torch before (raw TypeError)
    (dict(max_new_tokens=6.5), "max_new_tokens must be an int >= 1, got 6.5"),
    (dict(max_new_tokens=True), "max_new_tokens must be an int >= 1, got True"),
    (dict(max_length=2.5), "max_length must be an int"),
    (dict(num_beams=2, length_penalty="x"), "length_penalty must be a number, got 'x'"),
    (dict(num_beams="four"), "num_beams must be an int >= 1, got 'four'"),
    (dict(do_sample=True, temperature="hot"), "temperature must be a number >= 0"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty must be a number > 0"),
    (dict(min_length="a"), "min_length must be an int >= 0"),
    (dict(do_sample="yes"), "do_sample must be True or False"),
    (dict(do_sample=True, top_p=2.0), "top_p must be a number in [0, 1], got 2.0"),
    (dict(eos_token_id=[9, "x"]), "eos_token_id must be an int or a non-empty list of ints"),
    (dict(stop_check_every=0), "stop_check_every must be an int >= 1"),
    (dict(bad_words_ids=[[5, 500]]), "bad_words_ids holds [5, 500], outside the vocabulary"),
])
def test_values_of_the_wrong_type_or_range_raise_invalid_input_naming_them(model, kw, words):
    with pytest.raises(InvalidInputError) as e:
        model.generate(IDS, **({"max_new_tokens": 3} | kw))
    assert words in str(e.value), str(e.value)


def test_bad_values_in_a_generation_config_or_the_models_defaults_are_named_by_source(model):
    gc = GenerationConfig(max_new_tokens=3)
    gc.num_beams = "four"
    with pytest.raises(InvalidInputError, match="generation_config.num_beams must be an int >= 1, got 'four'"):
        model.generate(IDS, generation_config=gc)
    saved = model.generation_config.top_k
    model.generation_config.top_k = 2.5
    try:
        with pytest.raises(InvalidInputError, match="model.generation_config.top_k must be an int >= 0, got 2.5"):
            model.generate(IDS, max_new_tokens=3)
    finally:
        model.generation_config.top_k = saved


def test_eos_ids_outside_the_vocabulary_never_stop_a_sequence_as_in_transformers(model, make_ckpt):
    from conftest import hf_model

    ref = hf_model(make_ckpt("bert", "gpt2"))
    kw = dict(max_new_tokens=5, eos_token_id=500, pad_token_id=0)
    assert torch.equal(model.generate(IDS, **kw), ref.generate(IDS, attention_mask=torch.ones_like(IDS), **kw))
