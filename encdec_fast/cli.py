"""The `encdec-fast` command.

    encdec-fast generate PATH --input in.txt|in.jsonl --output out.jsonl [--max-new-tokens N --num-beams K ...]
    encdec-fast demo [--size small|base] [--batch 8] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import EncDecError

# generation flags exposed on the command line: (flag, type, help)
_GEN_FLAGS = [
    ("max_new_tokens", int, "tokens to generate at most"),
    ("max_length", int, "total decoder length at most"),
    ("min_new_tokens", int, "tokens to generate at least"),
    ("min_length", int, "total decoder length at least"),
    ("num_beams", int, "beam search width"),
    ("length_penalty", float, "beam length penalty"),
    ("no_repeat_ngram_size", int, "forbid repeating n-grams of this size"),
    ("repetition_penalty", float, "repetition penalty"),
    ("num_return_sequences", int, "sequences per input"),
    ("temperature", float, "sampling temperature"),
    ("top_k", int, "top-k sampling"),
    ("top_p", float, "nucleus sampling"),
    ("eos_token_id", int, "end-of-sequence token id"),
    ("pad_token_id", int, "padding token id"),
    ("decoder_start_token_id", int, "first decoder token id"),
]


def _read_inputs(path: str) -> list:
    """Text lines, or JSONL with "text" or "input_ids" per line."""
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise EncDecError(f"{path}:{n}: invalid JSON ({e}); give one JSON object or one text per line.") from None
                if "input_ids" in obj:
                    items.append(list(obj["input_ids"]))
                elif "text" in obj:
                    items.append(str(obj["text"]))
                else:
                    raise EncDecError(f"{path}:{n}: a JSON line needs a \"text\" or an \"input_ids\" field.")
            else:
                items.append(line)
    if not items:
        raise EncDecError(f"{path} holds no inputs; write one text (or JSON object) per line.")
    return items


def cmd_generate(a) -> int:
    import encdec_fast

    inputs = _read_inputs(a.input)
    model = encdec_fast.load(a.path, device=a.device, dtype=a.dtype)
    kwargs = {name: getattr(a, name) for name, _, _ in _GEN_FLAGS if getattr(a, name) is not None}
    if a.do_sample:
        kwargs["do_sample"] = True
    if a.seed is not None:
        import torch

        torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    with encdec_fast.Engine(model, max_batch_size=a.batch_size) as engine:
        results = engine.generate(inputs, progress=not a.quiet, return_exceptions=True, **kwargs)
    wall = time.perf_counter() - t0
    n_tok, n_err = 0, 0
    with open(a.output, "w", encoding="utf-8") as out:
        for i, r in enumerate(results):
            if isinstance(r, Exception):
                n_err += 1
                out.write(json.dumps({"index": i, "error": f"{type(r).__name__}: {r}"}) + "\n")
                continue
            rec = {"index": i, "output_ids": r.output_ids}
            if r.text is not None:
                rec["text"] = r.text
            n_tok += r.num_generated
            out.write(json.dumps(rec) + "\n")
    print(f"{len(results)} inputs, {n_err} errors, {n_tok} tokens in {wall:.2f} s = {n_tok / wall:.1f} tokens/s",
          file=sys.stderr)
    return 1 if n_err else 0


def cmd_demo(a) -> int:
    from .demo import run_demo

    return run_demo(size=a.size, batch=a.batch, new_tokens=a.new_tokens, src_len=a.src_len, device=a.device,
                    num_beams=a.num_beams)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="encdec-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate for every line of a file")
    g.add_argument("path", help="EncoderDecoderModel folder (with a tokenizer for text inputs)")
    g.add_argument("--input", required=True, help="text lines or JSONL ({\"text\": ...} or {\"input_ids\": [...]})")
    g.add_argument("--output", required=True, help="JSONL out: index, output_ids, text")
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--seed", type=int)
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    for name, typ, hlp in _GEN_FLAGS:
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, help=hlp)
    g.set_defaults(fn=cmd_generate)
    d = sub.add_parser("demo", help="build a random bert2gpt2, generate with encdec_fast and transformers, compare")
    d.add_argument("--size", default="small", choices=["tiny", "small", "base"])
    d.add_argument("--batch", type=int, default=8)
    d.add_argument("--src-len", type=int, default=64)
    d.add_argument("--new-tokens", type=int, default=32)
    d.add_argument("--num-beams", type=int, default=1)
    d.add_argument("--device", default=None)
    d.set_defaults(fn=cmd_demo)
    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except (EncDecError, OSError) as e:
        print(f"encdec-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
