"""Every family beyond BERT/RoBERTa/GPT-2, in every role, against transformers in the same test:
bert-generation (the checkpoints of Rothe et al. 2019), xlm-roberta, camembert, electra (embeddings
narrower than the hidden size, projected), and BART's decoder (BartForCausalLM) behind a BERT-family
encoder.

Tiny awkward sizes (hidden 32 or 48, 4 heads, intermediate 37, vocabulary 99), every weight perturbed
(conftest.perturb: biases non-zero, LayerNorm weights not 1). fp32: logits and encoder states within 1e-5
relative error, loss within 1e-5, greedy and beam tokens identical on a padded batch whose rows hit eos at
different steps, on the torch backend and the triton one (Triton's interpreter off-GPU); untied heads,
tie_encoder_decoder and glued pairs; from_transformers() bit-identical to load() of the saved folder.
"""

import pytest
import torch
from conftest import DEVICE, hf_model, perturb, plain
from test_generation import assert_same_generation, early_eos, run_both
from test_parity import make_inputs, rel_err

import encdec_fast

pytestmark = pytest.mark.usefixtures("quiet")

SIZE = dict(heads=4, intermediate=37, vocab=99, layers=2)
V = SIZE["vocab"]
NARROW = dict(embedding_size=20)  # ELECTRA embeddings narrower than hidden 32: embeddings_project
# name -> (encoder, decoder, build_checkpoint options); std/seed keep greedy outputs varied
PAIRS = {
    "bertgen2bertgen": ("bert-generation", "bert-generation", dict(std=0.15)),
    "xlmr2xlmr": ("xlm-roberta", "xlm-roberta", dict(std=0.15)),
    "camembert2camembert": ("camembert", "camembert", dict(std=0.15, seed=1, enc_kw=dict(hidden_act="gelu_new"),
                                                           dec_kw=dict(hidden_act="gelu_new"))),
    "electra2electra": ("electra", "electra", dict(std=0.15, enc_kw=NARROW, dec_kw=NARROW)),
    "bert2bart": ("bert", "bart", dict(std=0.15, dec_hidden=48, dec_kw=dict(scale_embedding=True))),  # enc_to_dec_proj
    "electra2bart": ("electra", "bart", dict(std=0.15, seed=1, enc_kw=NARROW)),
}
TOL = 1e-5


@pytest.fixture(scope="module")
def pair(make_ckpt):
    """pair(name) -> (ours on the CPU, transformers' model, folder); cached for the module."""
    cache = {}

    def get(name):
        if name not in cache:
            enc, dec, kw = PAIRS[name]
            path = make_ckpt(enc, dec, **SIZE, **kw)
            cache[name] = (encdec_fast.load(path, device="cpu"), hf_model(path), path)
        return cache[name]

    return get


def padded_batch(ref, lengths=(9, 5, 2), seed=0):
    """Right-padded input_ids and attention_mask with the encoder's pad id (ids >= 4: no special tokens)."""
    g = torch.Generator().manual_seed(seed)
    pad = ref.config.encoder.pad_token_id
    S = max(lengths)
    ids = torch.randint(4, V, (len(lengths), S), generator=g)
    mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, pad), mask


def forward_inputs(ref):
    """A padded encoder batch, decoder ids with a padded row, and labels with ignored positions."""
    pad, dpad = ref.config.encoder.pad_token_id, ref.config.pad_token_id
    ids, mask, dec = make_inputs(3, 13, 7, V, pad, padded=True, avoid=(pad, dpad))
    dmask = torch.ones_like(dec)
    dmask[1, 5:] = 0
    dec[1, 5:] = dpad
    labels = dec.clone()
    labels[1, 5:] = -100
    return ids, mask, dec, dmask, labels


def assert_forward_matches(ours, ref, tol=TOL):
    ids, mask, dec, dmask, labels = forward_inputs(ref)
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
        r_loss = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    o = ours(ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
    o_loss = ours(ids, attention_mask=mask, labels=labels).loss
    e_logits = rel_err(o.logits, r.logits, dmask.bool())
    e_enc = rel_err(o.encoder_last_hidden_state, r.encoder_last_hidden_state, mask.bool())
    e_loss = abs(o_loss.item() - r_loss.item())
    assert e_logits < tol and e_enc < tol and e_loss < tol, f"logits {e_logits:.2e}, encoder {e_enc:.2e}, loss {e_loss:.2e}"


@pytest.mark.parametrize("name", PAIRS)
def test_forward_logits_encoder_states_and_loss_match_transformers(pair, name):
    ours, ref, _ = pair(name)
    assert_forward_matches(ours, ref)


@pytest.mark.parametrize("name", PAIRS)
def test_greedy_matches_transformers_on_padded_batch_with_early_eos(pair, name):
    ours, ref, _ = pair(name)
    ids, mask = padded_batch(ref)
    eos = early_eos(ref, ids, mask)
    a, b = run_both(ours, ref, ids, mask, eos_token_id=eos)
    assert (a.sequences[:, 1:] == eos).any(), "no row finished early"
    assert_same_generation(a, b, beams=False)


@pytest.mark.parametrize("name", PAIRS)
def test_beam_search_matches_transformers_on_padded_batch_with_early_eos(pair, name):
    ours, ref, _ = pair(name)
    ids, mask = padded_batch(ref)
    kw = dict(num_beams=3, num_return_sequences=2, length_penalty=0.8)
    eos = early_eos(ref, ids, mask, **kw)
    a, b = run_both(ours, ref, ids, mask, eos_token_id=eos, **kw)
    assert_same_generation(a, b, beams=True)


@pytest.mark.parametrize("name", ["bertgen2bertgen", "electra2electra", "bert2bart"])
def test_triton_backend_matches_transformers(pair, name):
    _, ref, path = pair(name)
    ours = encdec_fast.load(path, device=DEVICE, dtype=torch.float32, backend="triton")
    ids, mask, dec, dmask, _ = forward_inputs(ref)
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=5)
    o = ours(ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
    err = rel_err(o.logits, r.logits, dmask.bool())
    assert err < TOL, f"logits rel err {err:.2e}"
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=5).cpu(), want)


@pytest.mark.parametrize("name", PAIRS)
def test_from_transformers_is_bit_identical_to_load_and_shares_nothing(pair, name):
    loaded, _, path = pair(name)
    hf = hf_model(path)  # its own copy: this test changes its weights
    conv = encdec_fast.from_transformers(hf, device="cpu")
    ours_b = dict(loaded.net.named_buffers())
    conv_b = dict(conv.net.named_buffers())
    assert ours_b.keys() == conv_b.keys()
    assert all(torch.equal(plain(ours_b[k]), plain(conv_b[k])) for k in ours_b)
    ids, mask, dec, dmask, _ = forward_inputs(hf)
    a = loaded(ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask).logits
    b = conv(ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask).logits
    assert torch.equal(a, b)
    for kw in (dict(max_new_tokens=6), dict(max_new_tokens=6, num_beams=3)):
        assert torch.equal(loaded.generate(ids, attention_mask=mask, **kw), conv.generate(ids, attention_mask=mask, **kw))
    assert conv.config is not hf.config and conv.generation_config is not hf.generation_config
    # nothing shared: changing the transformers model afterwards leaves ours alone
    theirs = {p.untyped_storage().data_ptr() for p in hf.parameters()}
    from encdec_fast.cpu.weights import PackedWeight

    mine = [b.values if isinstance(b, PackedWeight) else b for b in conv.net.buffers()]  # a packed weight: its values
    assert not theirs & {b.untyped_storage().data_ptr() for b in mine if not b.is_mkldnn}
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(1.0)
    hf.config.decoder_start_token_id = 7
    assert torch.equal(conv(ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask).logits, b)
    assert conv.config.decoder_start_token_id == 3


@pytest.mark.parametrize("dec", ["bert-generation", "electra", "bart", "xlm-roberta"])
def test_untied_lm_heads_match_transformers(make_ckpt, dec):
    enc = "bert" if dec == "bart" else dec
    kw = dict(tie_word_embeddings=False) | (NARROW if dec == "electra" else {})
    path = make_ckpt(enc, dec, **SIZE, std=0.15, dec_kw=kw)
    ours, ref = encdec_fast.load(path, device="cpu"), hf_model(path)
    assert ours.net.decoder.head.weight is not ours.net.decoder.embed.word
    assert not torch.equal(plain(ours.net.decoder.head.weight), ours.net.decoder.embed.word)
    assert_forward_matches(ours, ref)


def test_tied_heads_share_the_embedding_tensor(pair):
    for name in PAIRS:
        net = encdec_fast.load(pair(name)[2], prepack=False).net  # packed, the head is a reordered copy
        assert net.decoder.head.weight.data_ptr() == net.decoder.embed.word.data_ptr(), name


# ------------------------------------------------------------------------------------------------
# glued pairs: standalone checkpoints, as EncoderDecoderModel.from_encoder_decoder_pretrained reads them
# ------------------------------------------------------------------------------------------------
GLUED = [
    ("bert-generation", "BertGenerationEncoder", "bert-generation", "BertGenerationDecoder"),
    ("electra", "ElectraForPreTraining", "electra", "ElectraForCausalLM"),  # a discriminator's head is dropped
    ("xlm-roberta", "XLMRobertaForMaskedLM", "camembert", "CamembertForCausalLM"),
    ("electra", "ElectraModel", "bart", "BartForCausalLM"),
]


@pytest.mark.parametrize("enc,enc_cls,dec,dec_cls", GLUED, ids=[f"{e}2{d}" for e, _, d, _ in GLUED])
def test_glued_pair_matches_from_encoder_decoder_pretrained(tmp_path, enc, enc_cls, dec, dec_cls):
    """The decoder checkpoint holds cross-attention weights and widths match: every tensor comes from disk."""
    import transformers as T
    from conftest import half_config

    torch.manual_seed(3)
    ekw = NARROW if enc == "electra" else {}
    dkw = NARROW if dec == "electra" else {}
    size = dict(hidden=32, layers=2, heads=4, vocab=V, intermediate=37)
    enc_m = getattr(T, enc_cls)(half_config(enc, decoder=False, **size, **ekw))
    dec_m = getattr(T, dec_cls)(half_config(dec, decoder=True, **size, **dkw))
    for m in (enc_m, dec_m):
        perturb(m, 0.15)
    enc_m.save_pretrained(tmp_path / "enc")
    dec_m.save_pretrained(tmp_path / "dec")
    ref = T.EncoderDecoderModel.from_encoder_decoder_pretrained(str(tmp_path / "enc"), str(tmp_path / "dec")).eval()
    ref.config.decoder_start_token_id, ref.config.pad_token_id = 3, ref.config.decoder.pad_token_id
    ours = encdec_fast.load(encoder=tmp_path / "enc", decoder=tmp_path / "dec", device="cpu")
    ours.config.decoder_start_token_id, ours.config.pad_token_id = 3, ref.config.pad_token_id
    assert not ours.cfg.has_enc_to_dec_proj
    assert_forward_matches(ours, ref)


# ------------------------------------------------------------------------------------------------
# token_type_ids (BERT-family encoders with token type embeddings)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("enc,dec", [("bert", "gpt2"), ("electra", "bart")])
def test_token_type_ids_in_forward_and_generate_match_transformers(make_ckpt, enc, dec):
    ekw = dict(type_vocab_size=3) | (NARROW if enc == "electra" else {})
    path = make_ckpt(enc, dec, **SIZE, std=0.15, enc_kw=ekw)
    ours, ref = encdec_fast.load(path, device="cpu"), hf_model(path)
    ids, mask = padded_batch(ref)
    types = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(1))
    dec_ids = torch.randint(4, V, (3, 5))
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, token_type_ids=types, decoder_input_ids=dec_ids)
        r0 = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids)
    o = ours(ids, attention_mask=mask, token_type_ids=types, decoder_input_ids=dec_ids)
    assert rel_err(o.logits, r.logits) < TOL and rel_err(o.encoder_last_hidden_state, r.encoder_last_hidden_state, mask.bool()) < TOL
    assert rel_err(o.logits, r0.logits) > 1e-3  # the types change the numbers
    zeros = ours(ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), decoder_input_ids=dec_ids).logits
    assert torch.equal(zeros, ours(ids, attention_mask=mask, decoder_input_ids=dec_ids).logits)
    for kw in (dict(), dict(num_beams=3, num_return_sequences=2)):
        a, b = run_both(ours, ref, ids, mask, token_type_ids=types, max_new_tokens=8, **kw)
        assert_same_generation(a, b, beams=bool(kw))


def test_token_type_ids_are_refused_where_the_encoder_has_none(pair):
    ours, ref, _ = pair("bertgen2bertgen")
    ids, mask = padded_batch(ref)
    with pytest.raises(encdec_fast.InvalidInputError, match="no token type embeddings"):
        ours(ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), decoder_input_ids=ids[:, :2])
    with pytest.raises(encdec_fast.InvalidInputError, match="no token type embeddings"):
        ours.generate(ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), max_new_tokens=2)


# ------------------------------------------------------------------------------------------------
# text in and out: a sentencepiece tokenizer (BertGenerationTokenizer) saved in the folder
# ------------------------------------------------------------------------------------------------
def sentencepiece_tokenizer(folder):
    """Train a tiny sentencepiece model offline and save a BertGenerationTokenizer into folder."""
    import io
    import random

    import sentencepiece as spm
    from transformers import BertGenerationTokenizer

    rng = random.Random(0)
    words = [f"w{i}" for i in range(50)]
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=80, model_type="unigram",
                                   pad_id=0, bos_id=1, unk_id=2, eos_id=3, minloglevel=2, hard_vocab_limit=False)
    (folder / "spm").mkdir()
    (folder / "spm" / "spiece.model").write_bytes(model.getvalue())
    tok = BertGenerationTokenizer(str(folder / "spm" / "spiece.model"))
    assert len(tok) <= V
    tok.save_pretrained(folder)
    return tok


def test_bert_generation_folder_serves_text_through_its_sentencepiece_tokenizer(pair, tmp_path):
    import json
    import shutil

    from encdec_fast.cli import main

    path = tmp_path / "rothe_like"
    shutil.copytree(pair("bertgen2bertgen")[2], path)
    tok = sentencepiece_tokenizer(path)
    model = encdec_fast.load(path, device="cpu")
    texts = ["w1 w2 w3", "w40 w41 w7 w8 w9 w10 w11", "w5"]
    with encdec_fast.Engine(model) as engine:
        res = engine.generate(texts, max_new_tokens=6)
    for text, r in zip(texts, res):
        ids = tok(text)["input_ids"]
        assert r.input_ids == ids and len(ids) > 1
        assert r.output_ids == model.generate(torch.tensor([ids]), max_new_tokens=6)[0].tolist()
        assert r.text == tok.decode(r.output_ids, skip_special_tokens=True)
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    rc = main(["generate", str(path), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.jsonl"),
               "--max-new-tokens", "6", "--quiet", "--device", "cpu"])
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rc == 0 and [row["output_ids"] for row in rows] == [r.output_ids for r in res]
    assert [row["text"] for row in rows] == [r.text for r in res]


def test_engine_with_a_bart_decoder_forces_eos_like_generate(pair):
    """BART configs carry forced_eos_token_id=2: the engine's pool applies it at the same step as generate()."""
    ours, ref, _ = pair("bert2bart")
    assert ours.generation_config.forced_eos_token_id == 2
    inputs = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19]]
    with encdec_fast.Engine(ours) as engine:
        res = engine.generate(inputs, max_new_tokens=7)
    for x, r in zip(inputs, res):
        want = ref.generate(torch.tensor([x]), max_new_tokens=7)[0].tolist()
        assert r.output_ids == want
        assert r.output_ids[-1] == 2
