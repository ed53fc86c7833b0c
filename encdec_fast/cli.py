"""The `encdec-fast` command.

    encdec-fast generate PATH|ID --input in.txt|in.jsonl --output out.jsonl [--max-new-tokens N --num-beams K ...]
    encdec-fast generate PATH|ID --input a.txt b.jsonl ... --output OUT_DIR --ray [ADDRESS] [--num-actors N]
    encdec-fast serve PATH|ID [--host 127.0.0.1 --port 8000 --api-key KEY --max-queued 256 --body-timeout 10
                              --quantize int8 ...]
    encdec-fast demo [--size small|base] [--batch 8] [--new-tokens 32] [--dtype bfloat16] [--quantize int8]

PATH is a checkpoint folder; ID a Hugging Face Hub id ("org/name"), read from the local cache (downloaded
first when online; HF_HUB_OFFLINE=1 reads the cache alone).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .errors import EncDecError, EngineClosedError, InvalidInputError

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


def _json_input(line: str):
    """One JSONL line -> its input (token ids or text), or the InvalidInputError saying what is wrong."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        return InvalidInputError(f"invalid JSON ({e}); give one JSON object or one text per line.")
    if not isinstance(obj, dict):
        return InvalidInputError("a JSON line must hold an object with a \"text\" or an \"input_ids\" field.")
    if "input_ids" in obj:
        ids = obj["input_ids"]
        return ids if isinstance(ids, list) else InvalidInputError(f"\"input_ids\" must be a list of token ids, got {ids!r}.")
    if "text" in obj:
        text = obj["text"]
        return text if isinstance(text, str) else InvalidInputError(f"\"text\" must be a string, got {text!r}.")
    return InvalidInputError("a JSON line needs a \"text\" or an \"input_ids\" field.")


def parse_line(line: str):
    """One input line -> a text, a list of token ids, or the InvalidInputError of a malformed JSON line
    (None for a blank line): a JSON object with "text" or "input_ids", or else the line itself as text."""
    if not line.strip():
        return None
    return _json_input(line) if line.lstrip().startswith("{") else line


def _read_inputs(path: str) -> list:
    """Text lines, or JSONL with "text" or "input_ids" per line -> [(line number, input or the
    InvalidInputError of a malformed or undecodable line)]; blank lines are skipped."""
    with open(path, "rb") as f:
        data = f.read()
    items = []
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            items.append((n, InvalidInputError(f"the line is not UTF-8 ({e}); save the input file as UTF-8.")))
            continue
        item = parse_line(line)
        if item is not None:
            items.append((n, item))
    if not items:
        raise InvalidInputError(f"{path} holds no inputs; write one text (or JSON object) per line.")
    return items


class _Output:
    """The output JSONL: checked and emptied before any work (an older file never passes for this run's),
    one flushed line per input as it finishes (in finishing order, each with its index), rewritten in
    input order at the end (atomically: a crash then leaves the unsorted file, complete)."""

    def __init__(self, path: str):
        p = Path(path)
        if p.is_dir():
            raise InvalidInputError(f"--output {path!r} is a folder; name a file to write.")
        if not p.parent.is_dir():
            raise InvalidInputError(f"--output {path!r}: the folder {str(p.parent)!r} does not exist; create it first.")
        try:
            self.f = open(p, "w", encoding="utf-8")
        except OSError as e:
            raise InvalidInputError(f"cannot write --output {path!r}: {e.strerror or e}.") from None
        self.path, self.records, self.errors, self.tokens = p, {}, [], 0
        self.write_error = None  # the OSError that stopped writing, if any

    def add(self, i: int, outcome, line: int | None = None):
        if isinstance(outcome, BaseException):
            rec = {"index": i, "error": f"{type(outcome).__name__}: {outcome}"}
            if line is not None:
                rec["line"] = line
            self.errors.append((i, line, rec["error"]))
        else:
            rec = {"index": i, "output_ids": outcome.output_ids}
            if outcome.text is not None:
                rec["text"] = outcome.text
            self.tokens += outcome.num_generated
        self.records[i] = rec
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def close_sorted(self):
        self.f.close()
        tmp = self.path.with_name(self.path.name + ".sorting")
        with open(tmp, "w", encoding="utf-8") as f:
            for i in sorted(self.records):
                f.write(json.dumps(self.records[i]) + "\n")
        os.replace(tmp, self.path)


@contextlib.contextmanager
def _first_sigint_stops(engine):
    """Ctrl-C stops taking work: the engine closes (its current step completes, the rest fails with
    EngineClosedError) and generate() returns what is finished. A second Ctrl-C interrupts at once."""
    hit = {"sigint": False}
    if threading.current_thread() is not threading.main_thread():
        yield hit
        return

    def stop(signum, frame):
        hit["sigint"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        engine.close(timeout=0)

    old = signal.signal(signal.SIGINT, stop)
    try:
        yield hit
    finally:
        signal.signal(signal.SIGINT, old)


def _generate_kwargs(a) -> dict:
    kwargs = {name: getattr(a, name) for name, _, _ in _GEN_FLAGS if getattr(a, name) is not None}
    if a.do_sample:
        kwargs["do_sample"] = True
    return kwargs


def cmd_generate(a) -> int:
    if a.ray is not None:
        return cmd_generate_ray(a)
    if len(a.input) > 1:
        raise InvalidInputError(f"{len(a.input)} input files given; one at a time, or all of them through Ray (--ray).")
    import encdec_fast

    items = _read_inputs(a.input[0])
    out = _Output(a.output)
    todo = []  # (index, input) of the well-formed lines
    for i, (n, item) in enumerate(items):
        if isinstance(item, Exception):
            out.add(i, item, line=n)
        else:
            todo.append((i, item))
    interrupted = False
    t0 = time.perf_counter()
    try:
        model = encdec_fast.load(a.path, device=a.device, dtype=a.dtype, quantize=a.quantize)
        kwargs = _generate_kwargs(a)
        if a.seed is not None:
            import torch

            torch.manual_seed(a.seed)
        with encdec_fast.Engine(model, max_batch_size=a.batch_size) as engine, _first_sigint_stops(engine) as sigint:
            def save(j, outcome):  # each input as it settles
                if sigint["sigint"] and isinstance(outcome, EngineClosedError):
                    return  # not generated: left out of the output
                if not isinstance(outcome, Exception) and isinstance(outcome, BaseException):
                    return  # a second Ctrl-C
                try:
                    out.add(todo[j][0], outcome)
                except OSError as e:  # disk full...: stop, and say so below
                    out.write_error = out.write_error or e
                    engine.close(timeout=0)

            engine.generate([x for _, x in todo], progress=not a.quiet, return_exceptions=True, on_result=save, **kwargs)
        interrupted = sigint["sigint"]
    except KeyboardInterrupt:
        interrupted = True
    finally:
        out.close_sorted()
    wall = time.perf_counter() - t0
    if out.write_error is not None:
        raise out.write_error
    n_done = len(out.records)
    if interrupted:
        print(f"encdec-fast: interrupted: {n_done} of {len(items)} inputs finished and written to {str(out.path)!r}; "
              f"the other {len(items) - n_done} were not generated.", file=sys.stderr)
        return 130
    print(f"{len(items)} inputs, {len(out.errors)} errors, {out.tokens} tokens in {wall:.2f} s = "
          f"{out.tokens / wall:.1f} tokens/s", file=sys.stderr)
    for i, line, msg in sorted(out.errors)[:5]:
        print(f"  input {i}{f' (line {line})' if line is not None else ''}: {msg}", file=sys.stderr)
    if len(out.errors) > 5:
        print(f"  ... and {len(out.errors) - 5} more: see the \"error\" records in {str(out.path)!r}.", file=sys.stderr)
    return 1 if out.errors else 0


def _file_rows(row: dict) -> list[dict]:
    """Ray Data flat_map: one input file -> a row per non-blank line (file, line, input, parse_error)."""
    rows = []
    for n, item in _read_inputs(row["file"]):
        err = f"{type(item).__name__}: {item}" if isinstance(item, Exception) else None
        rows.append({"file": row["file"], "line": n, "input": None if err else item, "parse_error": err})
    return rows


def _merge_errors(row: dict) -> dict:
    """A line that did not parse keeps its parse error (the engine only saw a null input)."""
    err = row.pop("parse_error")
    if err is not None:
        row["error"] = err
    return row


def cmd_generate_ray(a) -> int:
    """Every line of every input file through Ray Data (encdec_fast.ray.generate_dataset); JSONL shards
    with file, line, input, output_ids, text, num_generated, error go to the --output folder."""
    import os

    from . import ray as edr  # first: a clear error when Ray is not installed

    ray = edr.ray

    missing = [f for f in a.input if not os.path.isfile(f)]
    if missing:
        raise InvalidInputError(f"input file(s) not found: {', '.join(missing)}.")
    if a.seed is not None:
        raise InvalidInputError("--seed is not taken with --ray (rows run on several actors); leave it out.")
    started = not ray.is_initialized()  # a caller's own Ray session is used as it is
    if started:
        ray.init(address=None if a.ray == "local" else a.ray, include_dashboard=False,
                 **({"num_cpus": a.ray_cpus} if a.ray == "local" and a.ray_cpus else {}))
    try:
        t0 = time.perf_counter()
        files = ray.data.from_items([{"file": os.path.abspath(f)} for f in a.input])
        rows = files.flat_map(_file_rows)
        path = os.path.abspath(a.path) if os.path.exists(a.path) else a.path  # a Hub id stays an id
        out = edr.generate_dataset(rows, path, num_actors=a.num_actors, num_gpus=a.gpus_per_actor,
                                   batch_size=a.batch_size, max_batch_size=a.batch_size, device=a.device,
                                   dtype=a.dtype, quantize=a.quantize, **_generate_kwargs(a)).map(_merge_errors).materialize()
        out.write_json(a.output)
        wall = time.perf_counter() - t0
        n, n_tok = out.count(), out.sum("num_generated") or 0
        n_err = out.filter(lambda r: r["error"] is not None).count()
    finally:
        if started:
            ray.shutdown()
    print(f"{n} inputs, {n_err} errors, {n_tok} tokens in {wall:.2f} s = {n_tok / wall:.1f} tokens/s "
          f"(JSONL in {a.output})", file=sys.stderr)
    return 1 if n_err else 0


def cmd_serve(a) -> int:
    from .server import ServerLimits, serve

    limits = ServerLimits(max_queued=a.max_queued, request_timeout_s=a.request_timeout, body_timeout_s=a.body_timeout,
                          max_body_bytes=a.max_body_bytes, max_input_tokens=a.max_input_tokens,
                          max_request_tokens=a.max_request_tokens, api_key=a.api_key, stalled_after_s=a.stalled_after)
    return serve(a.path, host=a.host, port=a.port, limits=limits, max_batch_size=a.max_batch_size,
                 max_batch_tokens=a.max_batch_tokens, device=a.device, dtype=a.dtype, quantize=a.quantize,
                 log_level=a.log_level, model_name=a.served_model_name)


def cmd_demo(a) -> int:
    from .demo import run_demo

    return run_demo(size=a.size, batch=a.batch, new_tokens=a.new_tokens, src_len=a.src_len, device=a.device,
                    num_beams=a.num_beams, dtype=a.dtype, quantize=a.quantize)


def _model_flags(p):
    """The flags every subcommand loads a model with."""
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="int8 projection weights (fp16 scales per 32 inputs), fp32 activations on the CPU")


def _generate_parser(sub):
    g = sub.add_parser("generate", help="generate for every line of a file")
    g.add_argument("path", help="EncoderDecoderModel folder or Hub id \"org/name\" (with a tokenizer for text inputs)")
    g.add_argument("--input", required=True, nargs="+",
                   help="text lines or JSONL ({\"text\": ...} or {\"input_ids\": [...]}); several files with --ray")
    g.add_argument("--output", required=True, help="JSONL out, one line per input as it finishes (then sorted): index, "
                   "output_ids, text, or error (and line, for a malformed input line); with --ray: a folder")
    _model_flags(g)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--seed", type=int)
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    for name, typ, hlp in _GEN_FLAGS:
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, help=hlp)
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run through Ray Data: a cluster address (\"auto\" for the one this machine belongs to), "
                        "or nothing for a local Ray on this machine")
    g.add_argument("--num-actors", type=int, default=1, help="with --ray: engines (actors), each loading the model")
    g.add_argument("--gpus-per-actor", type=float, default=0, help="with --ray: GPUs per actor (1: one engine per GPU)")
    g.add_argument("--ray-cpus", type=int, default=None, help="with a local Ray: CPUs it may use (default: all)")
    g.set_defaults(fn=cmd_generate)


def _serve_parser(sub):
    v = sub.add_parser("serve", help="serve a checkpoint over HTTP (POST /v1/generate, /v1/completions, GET /health, "
                       "GET /metrics)")
    v.add_argument("path", help="EncoderDecoderModel folder or Hub id \"org/name\" (with a tokenizer for text inputs)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    v.add_argument("--port", type=int, default=8000)
    _model_flags(v)
    v.add_argument("--max-batch-size", type=int, default=32, help="decode rows stepped together")
    v.add_argument("--max-batch-tokens", type=int, default=16384, help="real (packed) source tokens per encoder batch")
    v.add_argument("--max-queued", type=int, default=256, help="requests admitted at once; more get 429")
    v.add_argument("--request-timeout", type=float, default=120.0, help="seconds a request may take; then 504")
    v.add_argument("--body-timeout", type=float, default=10.0,
                   help="seconds a request body may take to arrive; then 408 and the connection is closed")
    v.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    v.add_argument("--max-input-tokens", type=int, default=None, help="longer inputs get 400 (default: the model's)")
    v.add_argument("--max-request-tokens", type=int, default=1 << 16,
                   help="a request whose decode rows x (input + output tokens) exceed this gets 400")
    v.add_argument("--api-key", default=None, help="key every route but /health needs (default: $ENCDEC_FAST_API_KEY)")
    v.add_argument("--stalled-after", type=float, default=30.0,
                   help="/health answers 503 \"degraded\" while one engine turn has run longer than this (seconds)")
    v.add_argument("--served-model-name", default=None,
                   help="the `model` OpenAI clients pass to /v1/completions (default: PATH as given)")
    v.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    v.set_defaults(fn=cmd_serve)


def _demo_parser(sub):
    d = sub.add_parser("demo", help="build a random bert2gpt2, generate with encdec_fast and transformers, compare")
    d.add_argument("--size", default="small", choices=["tiny", "small", "base"])
    d.add_argument("--batch", type=int, default=8)
    d.add_argument("--src-len", type=int, default=64)
    d.add_argument("--new-tokens", type=int, default=32)
    d.add_argument("--num-beams", type=int, default=1)
    _model_flags(d)
    d.set_defaults(fn=cmd_demo)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="encdec-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for build in (_generate_parser, _serve_parser, _demo_parser):
        build(sub)
    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except (EncDecError, OSError) as e:
        print(f"encdec-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("encdec-fast: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
