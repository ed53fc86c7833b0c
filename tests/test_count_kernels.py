"""benchmarks/count_kernels.py: the kernel counter itself, and what a decode step launches."""

import importlib.util
import pathlib
import sys

import pytest
import torch
from kernel_checks import DEVICE

import encdec_fast
from encdec_fast.kernels import activation as kact


@pytest.fixture(scope="module")
def counter():
    spec = importlib.util.spec_from_file_location(
        "count_kernels", pathlib.Path(__file__).parent.parent / "benchmarks" / "count_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


def test_counts_working_ops_and_triton_launches_but_not_views(counter):
    x = torch.randn(4, 6, device=DEVICE)

    def fn():
        y = x.view(6, 4).t().unsqueeze(0)  # views: no kernel
        z = (y + 1).sum()  # two kernels
        kact.bias_gelu(x, None, "tanh")  # one Triton launch (its allocation is no kernel)
        return z.item()  # a host read

    c = counter.count_kernels(fn)
    assert dict(c.aten) == {"add": 1, "sum": 1}, c.table()
    assert dict(c.triton) == {"_bias_gelu_kernel": 1} and c.total == 3
    assert sum(c.host_reads.values()) == 1


@pytest.mark.parametrize("dec", ["gpt2", "bert"])
def test_decode_step_has_one_attention_launch_per_attention_and_no_separate_cache_write(counter, make_ckpt, dec):
    """Triton backend: per layer, self- and cross-attention are one launch each (the KV-cache write is
    inside the self-attention kernel: no index_put/index_copy), and the step reads nothing on the host."""
    counts = {}
    for layers in (1, 2):
        model = encdec_fast.load(make_ckpt("bert", dec, layers=layers), device=DEVICE, dtype=torch.float32,
                                 backend="triton")
        step = counter.decode_step_fn(model, rows=2, src_len=5, pos=3)
        step()
        counts[layers] = c = counter.count_kernels(step)
        assert c.triton["_decode_kernel"] == 2 * layers, c.table()
        assert not {"index_put", "index_put_", "index_copy_", "index_copy"} & set(c.aten), c.table()
        assert not c.host_reads, c.table()
    per_layer = counts[2].total - counts[1].total
    assert per_layer == 8, f"{dec}: {per_layer} kernels per layer\n{counts[2].table()}"


@pytest.mark.parametrize("enc,dec", [("bert", "gpt2"), ("bert", "bert"), ("roberta", "roberta")])
def test_whole_greedy_step_is_eight_launches_per_layer_and_four_more(counter, make_ckpt, enc, dec):
    """Triton backend, generate()'s whole DecodeState step for greedy rows: 8 launches per decoder layer,
    and 4 besides (the embeddings, the LM head, the pass over the logits, the bookkeeping), 5 with BERT's
    head transform (its dense + GELU is a projection of its own); no torch op and no host read."""
    layers = 2
    model = encdec_fast.load(make_ckpt(enc, dec, layers=layers), device=DEVICE, dtype=torch.float32, backend="triton")
    c = counter.count_kernels(counter.state_step_fn(model, rows=3, src_len=5, new_tokens=8))
    head = 2 if model.cfg.decoder.head_transform else 1
    assert c.total == 8 * layers + 3 + head and not c.aten and not c.host_reads, c.table()
    assert {k: c.triton[k] for k in ("_embed_step_kernel", "_scan_kernel", "_commit_kernel")} == \
        {"_embed_step_kernel": 1, "_scan_kernel": 1, "_commit_kernel": 1}, c.table()
