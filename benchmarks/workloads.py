"""Workloads W1-W4, shared checkpoint building, timing and physical floors.

Sized for a GPU when CUDA is present, shrunk on the CPU so `pytest benchmarks/` stays short there;
ENCDEC_BENCH_SIZE=base runs W4 alone at bert-base + gpt2 size on the CPU (16 sources for the encoder,
8 end to end: what a 2-core machine finishes in minutes).
  W1  bert-base + gpt2, batch 1, 512 source tokens, 128 new tokens, greedy
  W2  same model, batch 64 and 256, 256 source tokens, 64 new tokens, greedy and beam 4
  W3  encoder only, batch 64 x 512 tokens
  W1/W2 "rothe": the size people run from Rothe et al. 2019 (google/roberta2roberta_L-24_*,
      bert2bert_L-24_*): bert-generation on both sides, 24 layers x 1024, 16 heads, vocabulary 50358
  W4  mixed lengths: 64 sources of lengths uniform in 32-512 (seeded), padded to the longest; encoder
      only, and end to end with 64 new tokens greedy
Rows of W1-W3 are also padded (lengths between half and all of the source length, the first row
full); every floor counts real tokens only (the work a packed encoder and cross-attention must do).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32

BASE = CUDA or os.environ.get("ENCDEC_BENCH_SIZE") == "base"
# (layers, hidden, heads, vocab) for the encoder and the decoder alike, per workload model
MODELS = {
    "bert2gpt2": (12, 768, 12, 50257) if BASE else (2, 128, 4, 4000),
    "rothe": (24, 1024, 16, 50358) if CUDA else (2, 128, 4, 4000),
}


@dataclass(frozen=True)
class Workload:
    name: str
    batch: int
    src_len: int
    new_tokens: int
    num_beams: int = 1
    encoder_only: bool = False
    model: str = "bert2gpt2"  # a key of MODELS
    min_len: int = 0  # > 0: source lengths uniform in [min_len, src_len] (W4)

    @property
    def label(self):
        name = self.name if self.model == "bert2gpt2" else f"{self.name} {self.model}"
        src = f"{self.min_len}-{self.src_len}" if self.min_len else f"{self.src_len}"
        if self.encoder_only:
            return f"{name} encoder b{self.batch}x{src}"
        mode = "greedy" if self.num_beams == 1 else f"beam{self.num_beams}"
        return f"{name} b{self.batch} src{src} new{self.new_tokens} {mode}"


if CUDA:
    WORKLOADS = [
        Workload("W1", 1, 512, 128),
        Workload("W2", 64, 256, 64),
        Workload("W2", 256, 256, 64),
        Workload("W2", 64, 256, 64, num_beams=4),
        Workload("W2", 256, 256, 64, num_beams=4),
        Workload("W3", 64, 512, 0, encoder_only=True),
        Workload("W1", 1, 512, 128, model="rothe"),
        Workload("W2", 64, 256, 64, model="rothe"),
        Workload("W2", 64, 256, 64, num_beams=4, model="rothe"),
        Workload("W4", 64, 512, 0, encoder_only=True, min_len=32),
        Workload("W4", 64, 512, 64, min_len=32),
    ]
elif BASE:
    WORKLOADS = [
        Workload("W4", 16, 512, 0, encoder_only=True, min_len=32),
        Workload("W4", 8, 512, 64, min_len=32),
    ]
else:
    WORKLOADS = [
        Workload("W1", 1, 64, 16),
        Workload("W2", 8, 32, 8),
        Workload("W2", 8, 32, 8, num_beams=4),
        Workload("W3", 8, 64, 0, encoder_only=True),
        Workload("W1", 1, 64, 16, model="rothe"),
        Workload("W2", 8, 32, 8, model="rothe"),
        Workload("W4", 16, 64, 0, encoder_only=True, min_len=4),
        Workload("W4", 8, 64, 8, min_len=4),
    ]

PROVIDERS = ["encdec_fast-triton", "encdec_fast-torch", "transformers-sdpa", "transformers-eager"]
if not CUDA:
    PROVIDERS = ["encdec_fast-torch", "transformers-sdpa", "transformers-eager"]


def build_bert2gpt2(path: str, *, layers: int, hidden: int, heads: int, enc_vocab: int, dec_vocab: int,
                    positions: int = 1024, enc_positions: int = 512, seed: int = 0, std: float = 0.05,
                    embed_std: float | None = None) -> str:
    """Save a random bert2gpt2 EncoderDecoderModel with transformers (weights std 0.05, which keeps greedy
    outputs varied; biases 0, LayerNorms 1). Built on the CPU, not the meta device: to_empty() would
    untie lm_head from wte."""
    import transformers as T

    torch.manual_seed(seed)
    enc = T.BertConfig(vocab_size=enc_vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=4 * hidden, max_position_embeddings=enc_positions)
    dec = T.GPT2Config(vocab_size=dec_vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=positions,
                       is_decoder=True, add_cross_attention=True, bos_token_id=1, eos_token_id=2)
    cfg = T.EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 1, 0, 2
    return _save_random(cfg, path, seed, std, embed_std)


def build_bertgen2bertgen(path: str, *, layers: int, hidden: int, heads: int, vocab: int, positions: int = 512,
                          seed: int = 0) -> str:
    """Save a random bert-generation pair shaped like Rothe et al.'s (tied decoder head; weights std 0.05,
    biases 0, LayerNorms 1; pad 0, eos 1, decoder start 2 as BertGenerationConfig's defaults)."""
    import transformers as T

    torch.manual_seed(seed)
    half = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=4 * hidden, max_position_embeddings=positions)
    enc = T.BertGenerationConfig(**half)
    dec = T.BertGenerationConfig(**half, is_decoder=True, add_cross_attention=True)
    cfg = T.EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 2, 0, 1
    return _save_random(cfg, path, seed)


def _save_random(cfg, path: str, seed: int, std: float = 0.05, embed_std: float | None = None) -> str:
    """An EncoderDecoderModel of this config with _randomise()d weights, saved to path."""
    import transformers as T

    model = T.EncoderDecoderModel(cfg)
    _randomise(model, seed, std, embed_std)
    model.save_pretrained(path)
    return path


def _randomise(model, seed: int, std: float = 0.05, embed_std: float | None = None):
    """Weights std 0.05 (keeps greedy outputs varied), biases 0, LayerNorms 1; the word embeddings (and so a tied LM
    head) std embed_std when given (larger: peaked next-token distributions, the body's dynamics unchanged)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "LayerNorm" in name or ".ln_" in name:
                p.fill_(1.0)
            else:
                scale = embed_std if embed_std is not None and ("word_embeddings" in name or ".wte." in name) else std
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def build_checkpoint(path: str, model: str = "bert2gpt2", seed: int = 0) -> str:
    """A workload's checkpoint: bert-base encoder + gpt2-size decoder, or the Rothe-size bert-generation
    pair, on CUDA; shrunk on the CPU."""
    L, E, H, V = MODELS[model]
    if model == "rothe":
        return build_bertgen2bertgen(path, layers=L, hidden=E, heads=H, vocab=V, seed=seed)
    return build_bert2gpt2(path, layers=L, hidden=E, heads=H, enc_vocab=input_vocab(model), dec_vocab=V, seed=seed)


def input_vocab(model: str) -> int:
    """Source ids are drawn below this (the encoder's vocabulary)."""
    return 30522 if BASE and model == "bert2gpt2" else MODELS[model][3]


def load_provider(path: str, provider: str):
    if provider.startswith("encdec_fast"):
        import encdec_fast

        return encdec_fast.load(path, device=DEVICE, dtype=DTYPE, backend=provider.split("-")[1])
    import transformers as T

    m = T.EncoderDecoderModel.from_pretrained(path, attn_implementation=provider.split("-")[1], dtype=DTYPE)
    return m.to(DEVICE).eval()


def inputs(w: Workload, vocab: int, seed: int = 0):
    """Random ids (never the special ids 0-2), right-padded rows of varied length: W4's lengths uniform in
    [min_len, src_len], padded to the longest; the others' between src_len/2 and src_len, the first full."""
    g = torch.Generator().manual_seed(seed)
    if w.min_len:
        lens = torch.randint(w.min_len, w.src_len + 1, (w.batch,), generator=g)
        ids = torch.randint(3, vocab, (w.batch, int(lens.max())), generator=g)
    else:
        ids = torch.randint(3, vocab, (w.batch, w.src_len), generator=g)
        lens = torch.randint(max(1, w.src_len // 2), w.src_len + 1, (w.batch,), generator=g)
        lens[0] = w.src_len
    mask = torch.ones_like(ids)
    for b in range(w.batch):
        mask[b, lens[b]:] = 0
        ids[b, lens[b]:] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def run_once(model, provider: str, w: Workload, ids, mask):
    """One full request of the workload, synchronised. Returns the output tensor."""
    with torch.inference_mode():
        if w.encoder_only:
            if provider.startswith("encdec_fast"):
                out = model.encode(ids, mask)[0]
            else:
                out = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=w.new_tokens, min_new_tokens=w.new_tokens,
                                 num_beams=w.num_beams, do_sample=False, early_stopping=True)
    sync()
    return out


def measure_bandwidth_and_flops() -> dict:
    """Measured ceilings on this device: device-to-device copy GB/s (read + write) and bf16 matmul TFLOP/s."""
    if not CUDA:
        return {}
    import triton.testing as tt

    def copy_ms(n: int) -> float:
        x = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
        y = torch.empty_like(x)
        return tt.do_bench(lambda: y.copy_(x), return_mode="median")

    def matmul_ms(n: int) -> float:
        a, b = (torch.randn(n, n, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        return tt.do_bench(lambda: a @ b, return_mode="median")

    elems = 2 * 1024**3 // 2
    bw = 2 * elems * 2 / (copy_ms(elems) * 1e-3)
    fl = 2 * 8192**3 / (matmul_ms(8192) * 1e-3)
    torch.cuda.empty_cache()
    return {"bandwidth_GBps": bw / 1e9, "bf16_TFLOPs": fl / 1e12}


def cross_kv_bytes(lengths: list[int], bytes_per: int, padded_to: int | None = None, model: str = "bert2gpt2") -> int:
    """Cross-attention K/V bytes of all decoder layers for sources of these lengths: what one decode
    step reads when each request's K/V is stored once (packed: real lengths), or when every row is
    padded to padded_to positions."""
    L, E, H, V = MODELS[model]
    tokens = len(lengths) * padded_to if padded_to is not None else sum(lengths)
    return L * 2 * E * bytes_per * tokens


def floor_seconds(w: Workload, ceilings: dict, enc_bytes: int, dec_bytes: int, bytes_per: int,
                  lengths: list[int]) -> float | None:
    """Lower bound on the workload's time for sources of these real lengths: each decode step must read
    the decoder weights and the KV bytes (self cache so far + cross K/V of the real source tokens); the
    encoder (real tokens only) and the prefill are bounded by FLOPs."""
    if not ceilings:
        return None
    L, E, H, V = MODELS[w.model]
    bw, fl = ceilings["bandwidth_GBps"] * 1e9, ceilings["bf16_TFLOPs"] * 1e12
    enc_params = enc_bytes / bytes_per
    enc_flops = 2 * enc_params * sum(lengths) + 4 * sum(n * n for n in lengths) * E * L
    enc_t = max(enc_flops / fl, enc_bytes / bw)
    if w.encoder_only:
        return enc_t
    rows = w.batch * w.num_beams
    cross = cross_kv_bytes(lengths, bytes_per, model=w.model)
    t = enc_t
    for step in range(w.new_tokens):
        kv = L * 2 * E * bytes_per * rows * (step + 1) + cross
        flops = 2 * (dec_bytes / bytes_per) * rows
        t += max((dec_bytes + kv) / bw, flops / fl)
    return t


RESULTS_JSON = os.environ.get("ENCDEC_BENCH_JSON")


def save_results(results: list[dict]):
    if RESULTS_JSON:
        with open(RESULTS_JSON, "w") as f:
            json.dump(results, f, indent=1)
