"""Whole-model forward parity against transformers' EncoderDecoderModel, built in the same test."""

import pytest
import torch
from conftest import hf_model, plain

import encdec_fast

PAIRS = [("bert", "gpt2"), ("bert", "bert"), ("roberta", "roberta"), ("roberta", "gpt2")]


def rel_err(a, b, mask=None):
    a, b = a.float().cpu(), b.float().cpu()  # ours may live on the GPU (default device there)
    if mask is not None:
        a, b = a[mask.cpu()], b[mask.cpu()]
    return ((a - b).abs().max() / b.abs().max()).item()


def make_inputs(B, S, T, vocab, pad, padded, seed=0, avoid=()):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, S), generator=g)
    for a in avoid:  # keep pad ids out of real tokens (RoBERTa positions skip them)
        ids[ids == a] = 5
    mask = torch.ones(B, S, dtype=torch.long)
    if padded and B > 1:
        for b in range(1, B):
            keep = max(1, S - (3 * b) % max(S, 1))
            mask[b, keep:] = 0
            ids[b, keep:] = pad
    dec = torch.randint(4, vocab, (B, T), generator=g)
    for a in avoid:
        dec[dec == a] = 5
    return ids, mask, dec


def compare(path, B, S, T, padded, dec_padded=False):
    ref = hf_model(path)
    ours = encdec_fast.load(path)
    pad = ref.config.encoder.pad_token_id
    dpad = ref.config.pad_token_id
    ids, mask, dec = make_inputs(B, S, T, ref.config.encoder.vocab_size, pad, padded, avoid=(pad, dpad))
    dmask = None
    if dec_padded and B > 1 and T > 2:
        dmask = torch.ones(B, T, dtype=torch.long)
        dmask[1, T - 2:] = 0
        dec[1, T - 2:] = dpad
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
    o = ours(ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
    valid = None if dmask is None else dmask.bool()
    e_logits = rel_err(o.logits, r.logits, valid)
    enc_valid = mask.bool()
    e_enc = rel_err(o.encoder_last_hidden_state, r.encoder_last_hidden_state, enc_valid)
    assert o.logits.shape == r.logits.shape
    assert e_logits < 1e-4, f"logits rel err {e_logits:.3e}"
    assert e_enc < 1e-4, f"encoder hidden rel err {e_enc:.3e}"


@pytest.mark.parametrize("enc,dec", PAIRS)
@pytest.mark.parametrize("padded", [False, True])
def test_forward_logits_match_transformers(make_ckpt, enc, dec, padded):
    compare(make_ckpt(enc, dec), B=3, S=33, T=7, padded=padded)


@pytest.mark.parametrize("S,T", [(1, 1), (7, 33), (33, 7), (1, 7)])
def test_forward_odd_lengths_match_transformers(make_ckpt, S, T):
    compare(make_ckpt("bert", "gpt2"), B=2, S=S, T=T, padded=S > 1)


@pytest.mark.parametrize("enc,dec", [("bert", "gpt2"), ("roberta", "roberta")])
def test_forward_with_padded_decoder_inputs_matches_at_real_positions(make_ckpt, enc, dec):
    compare(make_ckpt(enc, dec), B=2, S=9, T=7, padded=True, dec_padded=True)


@pytest.mark.parametrize("dec", ["gpt2", "bert"])
def test_enc_to_dec_proj_when_widths_differ(make_ckpt, dec):
    path = make_ckpt("bert", dec, enc_hidden=32, dec_hidden=48)
    assert encdec_fast.load(path).cfg.has_enc_to_dec_proj
    compare(path, B=2, S=7, T=5, padded=True)


@pytest.mark.parametrize("fmt", ["sharded", "bin", "legacy_bin"])
def test_weight_file_layouts_load_identically(make_ckpt, fmt):
    compare(make_ckpt("bert", "gpt2", fmt=fmt), B=2, S=7, T=5, padded=True)


def test_untied_lm_head_and_gpt2_scaling_flags(make_ckpt):
    path = make_ckpt("bert", "gpt2", dec_kw=dict(tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True,
                                                   reorder_and_upcast_attn=True))
    ours = encdec_fast.load(path, prepack=False)
    assert ours.net.decoder.head.weight.data_ptr() != ours.net.decoder.embed.word.data_ptr()
    compare(path, B=2, S=7, T=5, padded=False)


def test_tied_lm_head_shares_the_embedding_tensor(make_ckpt):
    ours = encdec_fast.load(make_ckpt("bert", "gpt2"), prepack=False)  # packed, the head is a reordered copy
    assert ours.net.decoder.head.weight.data_ptr() == ours.net.decoder.embed.word.data_ptr()


@pytest.mark.parametrize("enc,dec", [("bert", "gpt2"), ("roberta", "roberta")])
def test_loss_matches_transformers(make_ckpt, enc, dec):
    path = make_ckpt(enc, dec)
    ref, ours = hf_model(path), encdec_fast.load(path)
    pad = ref.config.encoder.pad_token_id
    ids, mask, _ = make_inputs(2, 9, 1, 97, pad, True, avoid=(pad, ref.config.pad_token_id))
    labels = torch.randint(4, 97, (2, 6))
    labels[labels == ref.config.pad_token_id] = 5
    labels[1, 4:] = -100
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, labels=labels)
    o = ours(ids, attention_mask=mask, labels=labels)
    assert abs(o.loss.item() - r.loss.item()) < 1e-5, (o.loss.item(), r.loss.item())
    assert rel_err(o.logits, r.logits) < 1e-4


def test_encoder_outputs_argument_skips_the_encoder(make_ckpt):
    path = make_ckpt("bert", "gpt2")
    ref, ours = hf_model(path), encdec_fast.load(path)
    ids, mask, dec = make_inputs(2, 7, 5, 97, 0, True)
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    enc = ours(ids, attention_mask=mask, decoder_input_ids=dec).encoder_last_hidden_state
    o = ours(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=dec)
    assert rel_err(o.logits, r.logits) < 1e-4


def _save_half(model, path):
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("dec", ["gpt2", "bert"])
def test_glued_encoder_and_decoder_match_from_encoder_decoder_pretrained(tmp_path, dec):
    """Decoder checkpoint already holds cross-attention weights: every tensor comes from disk."""
    import transformers as T
    from conftest import half_config

    torch.manual_seed(1)
    enc_m = T.BertModel(half_config("bert", hidden=32, layers=2, heads=2, vocab=97, decoder=False))
    dc = half_config(dec, hidden=48, layers=2, heads=2, vocab=97, decoder=True)
    dec_m = (T.GPT2LMHeadModel if dec == "gpt2" else T.BertLMHeadModel)(dc)
    with torch.no_grad():
        for m in (enc_m, dec_m):
            for n, p in m.named_parameters():
                if "LayerNorm" not in n and "ln_" not in n:
                    p.normal_(0, 0.3)
    ep, dp = _save_half(enc_m, tmp_path / "enc"), _save_half(dec_m, tmp_path / "dec")
    ref = T.EncoderDecoderModel.from_encoder_decoder_pretrained(str(ep), str(dp)).eval()
    ours = encdec_fast.load(encoder=ep, decoder=dp, prepack=False)
    assert ours.cfg.has_enc_to_dec_proj
    # the projection is new in both (random): give ours transformers' values
    ours.net.enc_to_dec_proj.weight.copy_(ref.enc_to_dec_proj.weight)
    ours.net.enc_to_dec_proj.bias.copy_(ref.enc_to_dec_proj.bias)
    ours.prepack = True  # then the CPU default, packed weights: to() packs them and picks their op table
    ours.to(ours.device)
    ids, mask, decids = make_inputs(2, 9, 6, 97, 0, True)
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=decids)
    o = ours(ids, attention_mask=mask, decoder_input_ids=decids)
    assert rel_err(o.logits, r.logits) < 1e-4


def test_glued_decoder_without_cross_attention_is_initialised_reproducibly_with_one_warning(tmp_path):
    import transformers as T
    from conftest import half_config

    torch.manual_seed(2)
    ep = _save_half(T.BertModel(half_config("bert", hidden=32, layers=1, heads=2, vocab=97, decoder=False)), tmp_path / "e")
    gc = half_config("gpt2", hidden=32, layers=1, heads=2, vocab=97, decoder=False)
    dp = _save_half(T.GPT2LMHeadModel(gc), tmp_path / "d")
    with pytest.warns(UserWarning, match="crossattention") as rec:
        a = encdec_fast.load(encoder=ep, decoder=dp, seed=7)
    [w] = [w for w in rec if "only the combined model has" in str(w.message)]
    assert w.filename == __file__  # the warning points at the caller's load(), not at encdec_fast
    b = encdec_fast.load(encoder=ep, decoder=dp, seed=7)
    c = encdec_fast.load(encoder=ep, decoder=dp, seed=8)
    wa, wb, wc = (plain(m.net.decoder.layers[0].cross.q.weight) for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    ids = torch.randint(4, 97, (1, 5))
    assert torch.equal(a(ids, decoder_input_ids=ids).logits, b(ids, decoder_input_ids=ids).logits)


@pytest.mark.parametrize("fam", ["bert", "bert-generation", "electra"])
def test_tie_encoder_decoder_checkpoint_takes_missing_decoder_tensors_from_the_encoder(tmp_path, fam):
    """A bert2bert (or Rothe et al.'s shared bert-generation pair) saved with tie_encoder_decoder=True
    (transformers 4.x) stores the shared body once."""
    import json

    from conftest import build_checkpoint
    from safetensors.torch import load_file, save_file

    from encdec_fast.checkpoint.weight_map import DECODER_BASE

    kw = dict(embedding_size=24) if fam == "electra" else {}
    path = build_checkpoint(tmp_path / "tied", fam, fam, enc_kw=kw, dec_kw=kw)
    ref = hf_model(path)
    base = DECODER_BASE[fam]
    with torch.no_grad():  # make the decoder body equal to the encoder's, as tying does
        enc_sd = ref.encoder.state_dict()
        for n, p in ref.decoder.get_submodule(base.rstrip(".")).named_parameters():
            if n in enc_sd and "crossattention" not in n:
                p.copy_(enc_sd[n])
    ref.save_pretrained(path)
    sd = load_file(str(path / "model.safetensors"))
    base = "decoder." + base
    dropped = [k for k in sd if k.startswith(base) and "encoder." + k[len(base):] in sd]
    assert len(dropped) > 10
    for k in dropped:
        del sd[k]
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["tie_encoder_decoder"] = True
    (path / "config.json").write_text(json.dumps(cfg))
    ours = encdec_fast.load(path)
    ids, mask, dec = make_inputs(2, 9, 6, 97, 0, True)
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    assert rel_err(ours(ids, attention_mask=mask, decoder_input_ids=dec).logits, r.logits) < 1e-4
    # the same as a legacy pre-zip .bin (read whole, each tensor let go after its last read: the encoder's
    # tensors are read twice, for the decoder too)
    import shutil

    legacy = tmp_path / "legacy"
    shutil.copytree(path, legacy)
    (legacy / "model.safetensors").unlink()
    torch.save(sd, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    for pack in (True, False):
        got = encdec_fast.load(legacy, prepack=pack)(ids, attention_mask=mask, decoder_input_ids=dec).logits
        assert rel_err(got, r.logits) < 1e-4, pack
    # without the flag the same file is incomplete
    cfg["tie_encoder_decoder"] = False
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(encdec_fast.CheckpointError, match="missing tensors"):
        encdec_fast.load(path)


def test_to_changes_dtype_and_keeps_parity(make_ckpt):
    path = make_ckpt("bert", "gpt2")
    ours = encdec_fast.load(path, device="cpu")
    ids, mask, dec = make_inputs(2, 7, 5, 97, 0, True)
    want = ours(ids, attention_mask=mask, decoder_input_ids=dec).logits
    ours.to(dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and ours.backend == "torch"
    low = ours(ids, attention_mask=mask, decoder_input_ids=dec).logits
    # bf16 on the CPU computes in fp32 over bf16 weights where its kernels run (encdec_fast/cpu/): fp32 logits
    assert low.dtype in (torch.bfloat16, torch.float32) and rel_err(low.float(), want) < 5e-2
    ours.to(dtype=torch.float32)
    assert rel_err(ours(ids, attention_mask=mask, decoder_input_ids=dec).logits, want) < 5e-2
