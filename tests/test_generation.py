"""generate() against transformers' EncoderDecoderModel.generate on the same checkpoint (fp32, CPU):
greedy and beam search give identical tokens, beam sequences_scores and per-step scores agree, on
padded batches with sequences that finish early; batch invariance; decoder prefixes; how defaults
are resolved (generation_config.json, a GenerationConfig argument, kwargs, missing pad)."""

import warnings

import pytest
import torch
from conftest import hf_model
from transformers import GenerationConfig

import encdec_fast

PAIRS = [("bert", "gpt2"), ("bert", "bert"), ("roberta", "roberta")]
# weights that make greedy outputs diverse (BERT decoders with std 0.3 repeat one token)
CKPT_KW = {"gpt2": {}, "bert": dict(std=0.1, seed=1), "roberta": dict(std=0.1, seed=0)}
NEW = 14  # max_new_tokens


pytestmark = pytest.mark.usefixtures("quiet")


@pytest.fixture(scope="module")
def pair(make_ckpt):
    """pair(enc, dec, **ckpt_kw) -> (ours, transformers' model, folder); cached for the module."""
    cache = {}

    def get(enc, dec, **kw):
        kw = CKPT_KW[dec] | kw
        key = (enc, dec, repr(sorted(kw.items())))
        if key not in cache:
            path = make_ckpt(enc, dec, **kw)
            cache[key] = (encdec_fast.load(path, device="cpu"), hf_model(path), path)
        return cache[key]

    return get


def padded_batch(enc: str, lengths=(9, 5, 2), vocab=97, seed=0):
    """Right-padded input_ids and attention_mask (zeros at the end of shorter rows)."""
    g = torch.Generator().manual_seed(seed)
    pad = 1 if enc == "roberta" else 0
    S = max(lengths)
    ids = torch.randint(4, vocab, (len(lengths), S), generator=g)
    mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, pad), mask


def early_eos(hf, ids, mask, **kw):
    """An eos id that makes transformers' generate stop early, in some rows but not all at the same step:
    picked among the tokens generate(**kw), else plain greedy, emits (without eos) from step 2 on."""
    for options in (kw, {}):
        gen = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None, **options)[:, 1:]
        for step in range(2, NEW - 2):
            for r in range(gen.shape[0]):
                t = int(gen[r, step])
                first = [(row == t).nonzero()[0, 0].item() if (row == t).any() else NEW for row in gen]
                if min(first) > 0 and len(set(first)) > 1:
                    return t
    pytest.skip("random weights produced no usable eos token")


def assert_same_generation(a, b, beams: bool):
    """a: transformers' output, b: ours (both return_dict_in_generate with output_scores)."""
    assert a.sequences.shape == b.sequences.shape, (a.sequences.tolist(), b.sequences.tolist())
    assert torch.equal(a.sequences, b.sequences), (a.sequences.tolist(), b.sequences.tolist())
    assert len(a.scores) == len(b.scores)
    for step, (x, y) in enumerate(zip(a.scores, b.scores)):
        assert torch.equal(torch.isinf(x), torch.isinf(y)), f"step {step}: masked tokens differ"
        fin = torch.isfinite(x)
        err = (x[fin] - y[fin]).abs().max().item() if fin.any() else 0.0
        assert err < 1e-4, f"step {step}: max |score diff| {err:.2e}"
    if beams:
        err = (a.sequences_scores - b.sequences_scores).abs().max().item()
        assert err < 1e-4, f"sequences_scores differ by {err:.2e}: {a.sequences_scores} vs {b.sequences_scores}"
        assert torch.equal(a.beam_indices.long(), b.beam_indices.long())


def run_both(ours, hf, ids, mask, **kw):
    kw = dict(max_new_tokens=NEW, return_dict_in_generate=True, output_scores=True) | kw
    return hf.generate(ids, attention_mask=mask, **kw), ours.generate(ids, attention_mask=mask, **kw)


GREEDY = [
    {},
    dict(no_repeat_ngram_size=3, repetition_penalty=1.3, min_new_tokens=4),
    dict(bad_words_ids=[[5], [7, 8], [11, 12, 13]], min_length=6),
]
BEAM = [
    dict(num_beams=2),
    dict(num_beams=4, length_penalty=0.6, early_stopping=True),
    dict(num_beams=4, length_penalty=1.5, early_stopping=False, num_return_sequences=2),
    dict(num_beams=3, early_stopping="never", no_repeat_ngram_size=3, repetition_penalty=1.3),
    dict(num_beams=4, min_new_tokens=6, length_penalty=2.0, no_repeat_ngram_size=3),
]


@pytest.mark.parametrize("enc,dec", PAIRS)
@pytest.mark.parametrize("kw", GREEDY, ids=["plain", "ngram_rep_min", "badwords_minlen"])
def test_greedy_matches_transformers_on_padded_batch_with_early_eos(pair, enc, dec, kw):
    ours, hf, _ = pair(enc, dec)
    ids, mask = padded_batch(enc)
    eos = early_eos(hf, ids, mask, **kw)
    a, b = run_both(ours, hf, ids, mask, eos_token_id=eos, **kw)
    assert (a.sequences[:, 1:] == eos).any(), "no row finished early; the test would not cover eos handling"
    assert_same_generation(a, b, beams=False)


@pytest.mark.parametrize("enc,dec", PAIRS)
def test_greedy_matches_transformers_with_checkpoint_eos(pair, enc, dec):
    ours, hf, _ = pair(enc, dec)
    ids, mask = padded_batch(enc, lengths=(7, 3))
    a, b = run_both(ours, hf, ids, mask)
    assert_same_generation(a, b, beams=False)


@pytest.mark.parametrize("enc,dec", PAIRS)
@pytest.mark.parametrize("kw", BEAM, ids=["b2", "b4_lp0.6_early", "b4_lp1.5_ret2", "b3_never_ngram_rep",
                                          "b4_minnew_lp2"])
def test_beam_search_matches_transformers_on_padded_batch_with_early_eos(pair, enc, dec, kw):
    ours, hf, _ = pair(enc, dec)
    ids, mask = padded_batch(enc)
    eos = early_eos(hf, ids, mask, **kw)
    a, b = run_both(ours, hf, ids, mask, eos_token_id=eos, **kw)
    assert_same_generation(a, b, beams=True)


@pytest.mark.parametrize("enc,dec", [("bert", "gpt2")])
def test_beam_search_matches_transformers_without_eos_until_max_length(pair, enc, dec):
    ours, hf, _ = pair(enc, dec)
    ids, mask = padded_batch(enc, lengths=(6, 4))
    a, b = run_both(ours, hf, ids, mask, num_beams=3, eos_token_id=None, num_return_sequences=3, output_logits=True)
    assert_same_generation(a, b, beams=True)
    assert a.sequences.shape[1] == NEW + 1
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(a.logits, b.logits))


@pytest.mark.parametrize("enc,dec", PAIRS)
def test_returns_plain_tensor_like_transformers(pair, enc, dec):
    ours, hf, _ = pair(enc, dec)
    ids, mask = padded_batch(enc, lengths=(5, 8))
    for kw in ({}, dict(num_beams=3, num_return_sequences=2)):
        a = hf.generate(ids, attention_mask=mask, max_new_tokens=8, **kw)
        b = ours.generate(ids, attention_mask=mask, max_new_tokens=8, **kw)
        assert isinstance(b, torch.Tensor) and b.dtype == torch.long and not b.is_inference()
        assert torch.equal(a, b)


@pytest.mark.parametrize("enc,dec", PAIRS)
def test_greedy_is_batch_invariant(pair, enc, dec):
    ours, hf, _ = pair(enc, dec)
    lengths = (9, 5, 2, 7)
    ids, mask = padded_batch(enc, lengths=lengths, seed=3)
    eos = early_eos(hf, ids, mask)
    batch = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos)
    pad = ours.generation_config.pad_token_id
    for r, n in enumerate(lengths):
        alone = ours.generate(ids[r:r + 1, :n], max_new_tokens=NEW, eos_token_id=eos)[0]
        assert torch.equal(batch[r, :alone.shape[0]], alone), (r, batch[r].tolist(), alone.tolist())
        assert (batch[r, alone.shape[0]:] == pad).all()


@pytest.mark.parametrize("enc,dec", PAIRS)
def test_decoder_prefix_matches_transformers(pair, enc, dec):
    ours, hf, _ = pair(enc, dec)
    ids, mask = padded_batch(enc, lengths=(6, 3))
    prefixes = [torch.tensor([[17, 40], [50, 9]]),  # decoder start is prepended
                torch.tensor([[3, 17, 40], [3, 50, 9]])]  # already starts with it
    for prefix in prefixes:
        for kw in ({}, dict(num_beams=3, length_penalty=0.8)):
            a, b = run_both(ours, hf, ids, mask, decoder_input_ids=prefix, max_new_tokens=8, **kw)
            assert_same_generation(a, b, beams=bool(kw))


def test_pad_falls_back_to_eos_like_transformers(pair):
    ours, hf, _ = pair("bert", "bert", gen_kw={"pad_token_id": None})
    assert ours.generation_config.pad_token_id is None
    ids, mask = padded_batch("bert")
    eos = early_eos(hf, ids, mask)
    for kw in ({}, dict(num_beams=2)):
        a, b = run_both(ours, hf, ids, mask, eos_token_id=eos, **kw)
        assert_same_generation(a, b, beams=bool(kw))
    with pytest.warns(UserWarning, match="pad_token_id is not set"):
        warnings.simplefilter("always")
        ours.generate(ids, attention_mask=mask, max_new_tokens=3)


def test_generation_config_json_defaults_match_transformers(pair):
    """Options stored in generation_config.json apply when generate() gets none; the default max_length
    (20 new tokens) applies when no length is given."""
    ours, hf, _ = pair("bert", "gpt2", gen_kw={"num_beams": 3, "no_repeat_ngram_size": 2, "length_penalty": 0.5})
    ids, mask = padded_batch("bert", lengths=(4, 6))
    a = hf.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True)
    b = ours.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True)
    assert_same_generation(a, b, beams=True)


def test_generation_config_argument_and_kwargs_override_like_transformers(pair):
    ours, hf, _ = pair("roberta", "roberta")
    ids, mask = padded_batch("roberta", lengths=(5, 7))
    gc = GenerationConfig(num_beams=3, max_new_tokens=12, length_penalty=1.7, return_dict_in_generate=True,
                          output_scores=True)
    for kw in ({}, dict(max_new_tokens=6, num_beams=2), dict(num_beams=1, repetition_penalty=1.2)):
        a = hf.generate(ids, attention_mask=mask, generation_config=gc, **kw)
        b = ours.generate(ids, attention_mask=mask, generation_config=gc, **kw)
        assert_same_generation(a, b, beams=kw.get("num_beams", 3) > 1)
    assert gc.max_new_tokens == 12 and gc.num_beams == 3  # the argument is not modified


def test_eos_list_and_decoder_start_override_match_transformers(pair):
    ours, hf, _ = pair("bert", "gpt2")
    ids, mask = padded_batch("bert")
    eos = early_eos(hf, ids, mask)
    for kw in ({}, dict(num_beams=3)):
        a, b = run_both(ours, hf, ids, mask, eos_token_id=[2, eos], decoder_start_token_id=5, **kw)
        assert_same_generation(a, b, beams=bool(kw))


def test_output_types_match_transformers(pair):
    from transformers.generation.utils import (
        GenerateBeamEncoderDecoderOutput,
        GenerateEncoderDecoderOutput,
    )

    ours, _, _ = pair("bert", "gpt2")
    ids, mask = padded_batch("bert", lengths=(3, 2))
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=4, return_dict_in_generate=True)
    assert isinstance(out, GenerateEncoderDecoderOutput) and out.scores is None
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2, return_dict_in_generate=True)
    assert isinstance(out, GenerateBeamEncoderDecoderOutput) and out.sequences_scores is None


def test_late_stop_check_gives_the_same_result(pair):
    """Checking for finished sequences only every 8 steps (the GPU default) cuts back to the same output."""
    ours, hf, _ = pair("bert", "bert")
    ids, mask = padded_batch("bert")
    eos = early_eos(hf, ids, mask)
    for kw in ({}, dict(num_beams=3, early_stopping=True), dict(num_beams=2, length_penalty=0.5),
               dict(num_beams=4, num_return_sequences=2, early_stopping="never")):
        kw = dict(max_new_tokens=NEW, eos_token_id=eos, return_dict_in_generate=True, output_scores=True) | kw
        a = ours.generate(ids, attention_mask=mask, stop_check_every=1, **kw)
        b = ours.generate(ids, attention_mask=mask, stop_check_every=8, **kw)
        assert torch.equal(a.sequences, b.sequences) and len(a.scores) == len(b.scores)
        if "num_beams" in kw:
            assert torch.equal(a.sequences_scores, b.sequences_scores) and torch.equal(a.beam_indices, b.beam_indices)
