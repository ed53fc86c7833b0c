"""`encdec-fast demo`: a random bert2gpt2 built on the spot, generated with encdec_fast and with
transformers on the same token-id workload; prints both speeds and whether the tokens are identical.
With --dtype bfloat16 both run in bf16; with --quantize int8 encdec_fast's int8 model runs against
transformers in the dtype given (fp32 by default): the tokens then agree mostly, not exactly, and the
demo reports how many rows are identical."""

from __future__ import annotations

import tempfile
import time

import torch

SIZES = {  # encoder/decoder layers, hidden, heads, vocab
    "tiny": (2, 64, 2, 1000),
    "small": (4, 256, 4, 8000),
    "base": (12, 768, 12, 50257),  # bert-base + gpt2
}


def build(path: str, size: str, seed: int = 0):
    import transformers as T

    L, E, H, V = SIZES[size]
    torch.manual_seed(seed)
    enc = T.BertConfig(vocab_size=V, hidden_size=E, num_hidden_layers=L, num_attention_heads=H, intermediate_size=4 * E)
    dec = T.GPT2Config(vocab_size=V, n_embd=E, n_layer=L, n_head=H, is_decoder=True, add_cross_attention=True,
                       bos_token_id=1, eos_token_id=2)
    cfg = T.EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 1, 0, 2
    model = T.EncoderDecoderModel(cfg).eval()
    with torch.no_grad():  # larger weights than the default init give varied (non-repeating) outputs
        for n, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    return model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, reps=2):
    fn()  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def run_demo(size="small", batch=8, new_tokens=32, src_len=64, device=None, num_beams=1, dtype=None,
             quantize=None) -> int:
    import encdec_fast
    from encdec_fast.model import _check_quantize_early, _pick_device, _pick_dtype

    dev = _pick_device(device)  # a clear error for a device this machine lacks
    _check_quantize_early(quantize, dev, dtype, None, True)
    dt = _pick_dtype(dtype, torch.float32, dev)
    with tempfile.TemporaryDirectory() as d:
        print(f"building a random bert2gpt2 ({size}) checkpoint in {d} ...")
        ref = build(d, size).to(device=dev, dtype=dt)
        ours = encdec_fast.load(d, device=dev, dtype=dt, quantize=quantize)
    V = SIZES[size][3]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (batch, src_len), generator=g)
    mask = torch.ones_like(ids)
    for b in range(1, batch):  # varied source lengths
        keep = max(1, src_len - (b * src_len) // (2 * batch))
        mask[b, keep:] = 0
    ids, mask = ids.to(dev), mask.to(dev)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=num_beams, do_sample=False)
    t_ref, out_ref = _time(lambda: ref.generate(ids, attention_mask=mask, **kw), dev)
    t_ours, out_ours = _time(lambda: ours.generate(ids, attention_mask=mask, **kw), dev)
    same = out_ref.shape == out_ours.shape and bool((out_ref.cpu() == out_ours.cpu()).all())
    n = batch * new_tokens
    what = str(dt).replace("torch.", "") + (f", encdec_fast quantize={quantize}" if quantize else "")
    print(f"device {dev}, {what}, batch {batch}, source {src_len} tokens, {new_tokens} new tokens, num_beams {num_beams}")
    print(f"transformers : {t_ref:8.3f} s  {n / t_ref:10.1f} tokens/s")
    print(f"encdec_fast  : {t_ours:8.3f} s  {n / t_ours:10.1f} tokens/s  ({t_ref / t_ours:.2f}x)")
    if dt == torch.float32 and quantize is None:
        print(f"identical tokens: {same}")
        return 0 if same else 1
    rows = sum(bool(a.shape == b.shape and torch.equal(a, b)) for a, b in zip(out_ref.cpu(), out_ours.cpu()))
    print(f"identical rows: {rows} of {out_ref.shape[0]} (low precision: close to, not equal to, the reference)")
    return 0
