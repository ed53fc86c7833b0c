"""Peak resident memory of encdec_fast.load() relative to the checkpoint's weight bytes.

    python benchmarks/load_memory.py --size base      # bert-base + gpt2 (random weights)
    python benchmarks/load_memory.py --size small
    python benchmarks/load_memory.py --size rothe --format legacy_bin   # Rothe et al.'s bert-generation shape

--format: safetensors (default), bin (torch.save's zip format, memory-mapped) or legacy_bin (the pre-zip
format, which torch.load must read whole). --no-prepack loads with prepack=False (plain projection
weights; the default packs them for oneDNN on the CPU, a tied LM head getting its own packed copy).
--quantize int8 loads int8 projection weights (quantised as each is read); --dtype bfloat16 stores the rest
(or, without --quantize, everything) in bf16.

    python benchmarks/load_memory.py --size base --quantize int8                     # target: <= 0.5x
    python benchmarks/load_memory.py --size base --quantize int8 --dtype bfloat16

Builds the checkpoint with transformers in one process, then loads it in a fresh one and reports
(peak RSS during load - RSS before load) / weight bytes.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SIZES = {  # (encoder layers, hidden, heads, ffn), (decoder layers), vocab; bert2gpt2 unless a family is named
    "base": dict(enc=(12, 768, 12, 3072), dec_layers=12, vocab=50257),
    "medium": dict(enc=(6, 512, 8, 2048), dec_layers=6, vocab=16000),
    "small": dict(enc=(4, 256, 4, 1024), dec_layers=4, vocab=8000),
    # google/roberta2roberta_L-24_* and bert2bert_L-24_*: bert-generation on both sides
    "rothe": dict(enc=(24, 1024, 16, 4096), dec_layers=24, vocab=50358, family="bert-generation"),
}
FORMATS = ("safetensors", "bin", "legacy_bin")


def build(path: str, size: str, fmt: str = "safetensors"):
    import torch
    import transformers as T

    s = SIZES[size]
    L, E, H, F = s["enc"]
    if s.get("family") == "bert-generation":
        half = dict(vocab_size=s["vocab"], hidden_size=E, num_attention_heads=H, intermediate_size=F)
        enc = T.BertGenerationConfig(num_hidden_layers=L, **half)
        dec = T.BertGenerationConfig(num_hidden_layers=s["dec_layers"], is_decoder=True, add_cross_attention=True, **half)
    else:
        enc = T.BertConfig(vocab_size=30522 if size == "base" else s["vocab"], hidden_size=E, num_hidden_layers=L,
                           num_attention_heads=H, intermediate_size=F)
        dec = T.GPT2Config(vocab_size=s["vocab"], n_embd=E, n_layer=s["dec_layers"], n_head=H, is_decoder=True,
                           add_cross_attention=True)
    cfg = T.EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id = 0, 0
    with torch.device("meta"):
        model = T.EncoderDecoderModel(cfg)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty() gave the tied head its own tensor
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    if fmt == "safetensors":
        model.save_pretrained(path)
    else:  # a transformers-4 style folder: config.json and the whole state dict (tied tensors stored once)
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"), _use_new_zipfile_serialization=fmt == "bin")


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _nbytes(b) -> int:
    """A buffer's bytes: a packed low-precision weight's own values and scales (cpu/weights.py)."""
    values = getattr(b, "values", None)
    if values is not None and not callable(values):
        scale = getattr(b, "scale", None)
        return values.numel() * values.element_size() + (scale.numel() * 4 if scale is not None else 0)
    return b.numel() * b.element_size()


def measure(path: str, prepack: bool = True, quantize=None, dtype=None) -> dict:
    import torch
    import transformers  # noqa: F401
    from transformers import AutoConfig, EncoderDecoderConfig, GenerationConfig  # noqa: F401  (module imports are

    # not the loader's memory: on some images these lazy imports pull in hundreds of MB of optional integrations)
    import encdec_fast
    import encdec_fast.model  # noqa: F401

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    if torch.cuda.is_available():  # the CUDA context's host memory belongs to the baseline, not to load()
        torch.cuda.init()
        torch.empty(1, device="cuda")
    before = rss()
    t0 = time.perf_counter()
    model = encdec_fast.load(path, device="cpu", prepack=prepack, quantize=quantize, dtype=dtype)
    seconds = time.perf_counter() - t0
    # VmHWM: this process image's own peak. Not getrusage's ru_maxrss: Linux carries the forked parent's
    # high-water mark across exec into it (exec_mmap), so a measurement started from a big process (a
    # test run holding models, a GPU process with CUDA's libraries) read the parent's size, not load()'s
    peak = _status_kib("VmHWM") * 1024
    weights = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
    params = sum(_nbytes(b) for b in {id(b): b for b in model.net.buffers()}.values())
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return dict(weight_bytes=weights, model_bytes=params, rss_before=before, peak_rss=peak, load_s=seconds,
                peak_increase=peak - before, ratio=(peak - before) / weights,
                rss_anon=status["RssAnon"].strip(), rss_file=status["RssFile"].strip())


def run(size: str, fmt: str = "safetensors", prepack: bool = True, quantize=None, dtype=None) -> dict:
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, __file__, "--build", d, "--size", size, "--format", fmt], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        flag = ([] if prepack else ["--no-prepack"]) + (["--quantize", quantize] if quantize else []) + (
            ["--dtype", dtype] if dtype else [])
        out = subprocess.run([sys.executable, __file__, "--measure", d, *flag], check=True, capture_output=True,
                             text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="base", choices=sorted(SIZES))
    ap.add_argument("--format", default="safetensors", choices=FORMATS)
    ap.add_argument("--build")
    ap.add_argument("--measure")
    ap.add_argument("--no-prepack", dest="prepack", action="store_false")
    ap.add_argument("--quantize", default=None, choices=["int8"])
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    a = ap.parse_args()
    if a.build:
        build(a.build, a.size, a.format)
    elif a.measure:
        print(json.dumps(measure(a.measure, a.prepack, a.quantize, a.dtype)))
    else:
        r = run(a.size, a.format, a.prepack, a.quantize, a.dtype)
        opts = ("" if a.prepack else " prepack=False") + (f" quantize={a.quantize}" if a.quantize else "") + (
            f" dtype={a.dtype}" if a.dtype else "")
        print(f"{a.size} {a.format}{opts}: load {r['load_s']:.1f} s, weights {r['weight_bytes'] / 2**20:.0f} MiB, model "
              f"{r['model_bytes'] / 2**20:.0f} MiB, peak RSS increase during load {r['peak_increase'] / 2**20:.0f} MiB "
              f"= {r['ratio']:.2f}x the weights")
