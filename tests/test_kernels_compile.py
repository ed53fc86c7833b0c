"""Every Triton kernel compiled for the GPUs the project runs on (CUDA sm_90: H100, H200), on this CPU.

The interpreter runs the kernels' arithmetic (the other kernel tests) but never Triton's compiler: a
kernel that computes right there can still fail to compile for a GPU (a loop-carried value changing
type, an op the GPU backend lacks, too much shared memory for the chosen tiles). Here the launches are
recorded, with the argument types, constexprs, warps and stages they really get:
  - from tiny whole models on the triton backend (fp32 and fp16: forward, greedy, beam search), and
  - from the launchers called at real model sizes (bert-base / gpt2 / Rothe widths, 1-256 decode rows,
    512-token prefill), recorded without running (the interpreter would take minutes there),
every fp16 launch again in bf16, and each distinct one compiled by Triton's own compiler down to a cubin
(ptxas) by tests/kernel_compile.py in a process without the interpreter. The fused linear is compiled with int8
weights too (w8a16: load(quantize="int8") on CUDA). A GPU session then starts from
kernels known to compile, within sm_90's shared memory, and (fp16/bf16) without register spills."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_checks import ON_CUDA

import encdec_fast

pytestmark = pytest.mark.skipif(ON_CUDA, reason="on a GPU the kernel tests compile and run every kernel themselves")

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
          torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90 (H100, H200)


def _spec(fn, args, kwargs) -> dict:
    """One launch as Triton's compiler takes it: argument types, constexpr values, launch options."""
    params = list(inspect.signature(fn).parameters.values())
    bound = dict(zip([p.name for p in params], args)) | {k: v for k, v in kwargs.items() if k != "grid"}
    sig, const, div16 = {}, {}, []  # div16: arguments Triton's launcher marks divisible by 16, as on a GPU
    for i, p in enumerate(params):
        v = bound.get(p.name, p.default)
        ann = p.annotation
        if ann == "tl.constexpr" or getattr(ann, "__name__", "") == "constexpr" or v is None:
            sig[p.name], const[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _TYPES[v.dtype]
            if v.data_ptr() % 16 == 0:
                div16.append(i)
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int) and v == 1:  # the launcher specialises an integer 1 into a constant
            sig[p.name], const[p.name] = "constexpr", 1
        elif isinstance(v, int):
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                div16.append(i)
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} = {v!r} has no Triton type here")
    options = {k: bound[k] for k in ("num_warps", "num_stages") if k in bound}
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": sig, "constexprs": const, "options": options,
            "div16": div16}


@pytest.fixture
def recorder(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    specs, state = [], {"run": True}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        specs.append(_spec(self.fn, args, kwargs))
        if state["run"]:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    return specs, state


def _models(make_ckpt):
    ids = torch.tensor([[5, 9, 14, 22, 7, 31, 12], [6, 18, 4, 11, 0, 0, 0]])
    mask = (ids != 0).long()
    dec = torch.tensor([[3, 8, 15], [3, 1, 2]])
    for enc, name, hidden, heads in (("bert", "gpt2", 32, 2), ("roberta", "bert", 64, 1), ("bert", "bart", 32, 2)):
        path = make_ckpt(enc, name, enc_hidden=hidden, heads=heads)
        for dtype in (torch.float32, torch.float16):
            for quantize in (None, "int8") if name == "gpt2" else (None,):  # int8 weights: the w8a16 launches
                m = encdec_fast.load(path, backend="triton", dtype=dtype, quantize=quantize)
                m(ids, attention_mask=mask, decoder_input_ids=dec)
                m.generate(ids, attention_mask=mask, max_new_tokens=3)
                m.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2)


def _real_sizes():
    """The launchers at the sizes the GPU runs (bert-base + gpt2, Rothe's 1024 width, head dims 64 and 128),
    fp16; recorded, not run."""
    from encdec_fast.kernels import attention as katt
    from encdec_fast.kernels import commit as kcommit
    from encdec_fast.kernels import decode_attention as kdec
    from encdec_fast.kernels import embed as kembed
    from encdec_fast.kernels import layer_norm as kln
    from encdec_fast.kernels import linear as klin
    from encdec_fast.kernels import scan as kscan

    h = torch.float16

    def z(*shape, dtype=h):
        return torch.zeros(*shape, dtype=dtype)

    for E, H in ((768, 12), (1024, 16), (1024, 8)):
        D = E // H
        for rows in (1, 8, 64, 256):
            x, r = z(rows, E), z(rows, E)
            ln = (z(E), z(E), 1e-5)
            klin.fused_linear(x, z(3 * E, E), z(3 * E), x_ln=ln)
            klin.fused_linear(x, z(E, E), z(E), residual=r, residual_ln=ln)
            klin.fused_linear(x, z(4 * E, E), z(4 * E), x_ln=ln, gelu="tanh")
            klin.fused_linear(z(rows, 4 * E), z(E, 4 * E), z(E), residual=r)
            klin.fused_linear(x, z(50257, E), None, x_ln=ln)
            # int8 weights (load(quantize="int8"): w8a16) for the same projections and the LM head
            i8, sc, G = torch.int8, torch.float16, klin.INT8_GROUP  # scales [N, K / 32]
            klin.fused_linear(x, z(3 * E, E, dtype=i8), z(3 * E), x_ln=ln, w_scale=z(3 * E, E // G, dtype=sc))
            klin.fused_linear(x, z(E, E, dtype=i8), z(E), residual=r, residual_ln=ln, w_scale=z(E, E // G, dtype=sc))
            klin.fused_linear(x, z(4 * E, E, dtype=i8), z(4 * E), x_ln=ln, gelu="tanh",
                              w_scale=z(4 * E, E // G, dtype=sc))
            klin.fused_linear(z(rows, 4 * E), z(E, 4 * E, dtype=i8), z(E), residual=r,
                              w_scale=z(E, 4 * E // G, dtype=sc))
            klin.fused_linear(x, z(50257, E, dtype=i8), None, x_ln=ln, w_scale=z(50257, E // G, dtype=sc))
            q = z(rows, H, D)
            cache = z(rows * 640, H, D)
            starts = torch.arange(rows) * 640
            lens = torch.full((rows,), 200, dtype=torch.int32)
            kdec.decode_attention(q, cache, cache, scale=0.125, starts=starts, lens=lens, k_new=q, v_new=q, max_len=640)
            kdec.decode_attention(q, z(rows * 512, H, D), z(rows * 512, H, D), scale=0.125, starts=starts, lens=lens,
                                  max_len=512)
            seq = torch.ones(rows, 130, dtype=torch.long)
            t = torch.full((rows,), 5, dtype=torch.long)
            kembed.embed_step(seq, t, z(50257, E), z(1024, E), z(E), scale=1.0, offset=0, pad_id=0, skip_pad=False,
                              ln=ln, row_stride=640)
            kscan.scan_logits(z(rows, 50257), torch.ones(rows, dtype=torch.bool), torch.zeros(rows, dtype=torch.long),
                              torch.zeros(rows, dtype=torch.bool), argmax=True)
            kcommit.commit_tokens(t, seq, t.clone(), t + 9, torch.ones(rows, dtype=torch.bool),
                                  torch.ones(rows, dtype=torch.bool), torch.zeros(rows, dtype=torch.bool),
                                  torch.zeros(rows, dtype=torch.bool), torch.zeros(rows, dtype=torch.long),
                                  torch.zeros(rows, dtype=torch.long), torch.full((rows, 1), 2, dtype=torch.long),
                                  torch.tensor(0), torch.tensor(0))
        for B, L in ((1, 512), (8, 256)):
            q = z(B, L, H, D)
            katt.attention(q, q, q, scale=0.125, causal=True)
            katt.attention(q, q, q, scale=0.125, key_mask=torch.ones(B, L, dtype=torch.bool))
            cu = torch.arange(0, B * L + 1, L, dtype=torch.int32)
            katt.varlen_attention(q.flatten(0, 1), q.flatten(0, 1), q.flatten(0, 1), cu_seqlens=cu, max_seqlen=L,
                                  scale=0.125)
            kln.add_layer_norm(z(B * L, E), z(B * L, E), z(E), z(E), 1e-12)
    for D in (16, 32, 256):  # the other rows of the attention tile table
        q = z(2, 256, 4, D)
        katt.attention(q, q, q, scale=0.125, causal=True)
        katt.varlen_attention(q.flatten(0, 1), q.flatten(0, 1), q.flatten(0, 1),
                              cu_seqlens=torch.tensor([0, 256, 512], dtype=torch.int32), max_seqlen=256, scale=0.125)


SCALES = {"ws_ptr"}  # fp16 whatever the activations' dtype (int8 weights' group scales)


def test_every_kernel_compiles_for_sm90(make_ckpt, recorder, tmp_path):
    specs, state = recorder
    _models(make_ckpt)
    state["run"] = False
    _real_sizes()
    state["run"] = True
    with_bf16 = []
    for s in specs:
        with_bf16.append(s)
        if any(t == "*fp16" for k, t in s["signature"].items() if k not in SCALES):
            with_bf16.append(s | {"signature": {k: "*bf16" if t == "*fp16" and k not in SCALES else t
                                                for k, t in s["signature"].items()}})
    unique = list({json.dumps(s, sort_keys=True): s for s in with_bf16}.values())
    kernels = {s["kernel"] for s in unique}
    assert {"_embed_step_kernel", "_scan_kernel", "_commit_kernel", "_decode_kernel", "_fused_linear_kernel"} <= kernels, kernels
    if os.environ.get("ENCDEC_KERNEL_SPECS"):  # keep the launches, e.g. for ptxas -v (registers, spills)
        Path(os.environ["ENCDEC_KERNEL_SPECS"]).write_text(json.dumps(unique))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")  # compile for real: ptxas's report comes with it
    shards = 2  # the CI machine's cores: two compiler processes
    procs = []
    for i in range(shards):
        f = tmp_path / f"specs{i}.json"
        f.write_text(json.dumps(unique[i::shards]))
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).parent / "kernel_compile.py"), str(f)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    parts = []
    for proc in procs:
        out, err = proc.communicate(timeout=1500)
        assert proc.returncode == 0, err[-3000:]
        parts.append(json.loads(out.strip().splitlines()[-1]))
    unique = [s for i in range(shards) for s in unique[i::shards]]
    rows = [r for part in parts for r in part]
    failed = [(s["kernel"], s["signature"], s["constexprs"], r["error"]) for s, r in zip(unique, rows) if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(rows)} launches do not compile for sm_90:\n" + "\n".join(map(str, failed[:5]))
    big = [(s["kernel"], s["constexprs"], s["options"], r["shared"]) for s, r in zip(unique, rows) if r["shared"] > SHARED_LIMIT]
    assert not big, f"launches needing more shared memory than sm_90 has: {big[:5]}"
    # the GPU dtypes spill no register to local memory (spills are slow; they decided the attention tiles)
    half = [(s, r) for s, r in zip(unique, rows)
            if any(t in ("*fp16", "*bf16") for k, t in s["signature"].items() if k not in SCALES)]
    assert all(r["spill_stores"] is not None for _, r in half), "ptxas's report was not captured"
    spilling = [(s["kernel"], {k: v for k, v in s["constexprs"].items() if k.startswith(("BLOCK", "HEAD", "NUM"))},
                 s["options"], r["spill_stores"]) for s, r in half if r["spill_stores"] > 0]
    assert not spilling, f"fp16/bf16 launches that spill registers (bytes a thread): {spilling[:6]}"
    print(f"{len(rows)} launches of {len(kernels)} kernels compiled for sm_90")
