"""The whole model on backend="triton" (Triton's interpreter on the CPU, real kernels on CUDA)
against transformers, and, on CUDA, low-precision error against plain PyTorch's."""

import pytest
import torch
from conftest import DEVICE, hf_model
from test_parity import make_inputs, rel_err

import encdec_fast

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("enc,dec", [("bert", "gpt2"), ("bert", "bert")])
def test_triton_backend_logits_and_greedy_tokens_match_transformers(make_ckpt, enc, dec):
    path = make_ckpt(enc, dec, layers=2)
    ref = hf_model(path)
    ours = encdec_fast.load(path, device=DEVICE, dtype=torch.float32, backend="triton")
    ids, mask, dec_ids = make_inputs(2, 13, 7, 97, ref.config.encoder.pad_token_id, padded=True)
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids)
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    o = ours(ids, attention_mask=mask, decoder_input_ids=dec_ids)
    err = rel_err(o.logits.cpu(), r.logits)
    assert err < 1e-4, f"logits rel err {err:.3e}"
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False).cpu()
    assert torch.equal(got, want), f"\nours {got}\ntransformers {want}"


@pytest.mark.skipif(not CUDA, reason="fp16/bf16 whole-model error is judged on a GPU (bf16 is garbage under the interpreter)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("enc,dec", [("bert", "gpt2"), ("roberta", "roberta"), ("bert-generation", "bert-generation"),
                                     ("electra", "bart")])
def test_triton_low_precision_error_at_most_2x_torch(make_ckpt, enc, dec, dtype):
    path = make_ckpt(enc, dec, layers=2, std=0.1)
    ref32 = encdec_fast.load(path, device="cuda", dtype=torch.float32, backend="torch")
    tri = encdec_fast.load(path, device="cuda", dtype=dtype, backend="triton")
    tor = encdec_fast.load(path, device="cuda", dtype=dtype, backend="torch")
    ids, mask, dec_ids = make_inputs(4, 100, 37, 97, ref32.config.encoder.pad_token_id, padded=True)
    want = ref32(ids, attention_mask=mask, decoder_input_ids=dec_ids).logits.float()
    e_tri = rel_err(tri(ids, attention_mask=mask, decoder_input_ids=dec_ids).logits, want)
    e_tor = rel_err(tor(ids, attention_mask=mask, decoder_input_ids=dec_ids).logits, want)
    print(f"{dtype}: triton {e_tri:.3e}, torch {e_tor:.3e}")
    assert e_tri < 2e-2 and e_tri <= 2 * e_tor + 1e-3, f"triton {e_tri:.3e} vs torch {e_tor:.3e}"
