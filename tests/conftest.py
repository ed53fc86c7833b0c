"""Shared test setup: Triton's interpreter on CPU-only machines, and tiny checkpoints built with
transformers itself (never downloaded)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

_FAMILY = {"bert": "BertConfig", "roberta": "RobertaConfig", "gpt2": "GPT2Config", "xlm-roberta": "XLMRobertaConfig",
           "camembert": "CamembertConfig", "electra": "ElectraConfig", "bert-generation": "BertGenerationConfig"}
ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert")


def half_config(family: str, *, hidden: int, layers: int, heads: int, vocab: int, decoder: bool, intermediate=None, **kw):
    """A transformers config for one half; intermediate defaults to 2 * hidden + 5."""
    import transformers as T

    ffn = intermediate or 2 * hidden + 5
    if family == "gpt2":
        c = T.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=kw.pop("positions", 128),
                         n_inner=intermediate, bos_token_id=1, eos_token_id=2, **kw)
    elif family == "bart":  # BartForCausalLM reads the decoder_* fields (its DynamicCache sizes by encoder_layers)
        c = T.BartConfig(vocab_size=vocab, d_model=hidden, decoder_layers=layers, decoder_attention_heads=heads,
                         decoder_ffn_dim=ffn, encoder_layers=layers, encoder_attention_heads=heads, encoder_ffn_dim=ffn,
                         max_position_embeddings=kw.pop("positions", 130), pad_token_id=kw.pop("pad", 1), bos_token_id=0,
                         eos_token_id=2, **kw)
    else:
        pad = kw.pop("pad", 1 if family in ROBERTA_LIKE else 0)
        c = getattr(T, _FAMILY[family])(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                        num_attention_heads=heads, intermediate_size=ffn,
                                        max_position_embeddings=kw.pop("positions", 130), pad_token_id=pad,
                                        bos_token_id=0 if family in ROBERTA_LIKE else None,
                                        eos_token_id=2, **kw)
    if decoder:
        c.is_decoder, c.add_cross_attention = True, True
    return c


def perturb(model, std: float):
    """Every weight away from its initialisation: matrices and biases ~ N(0, std), LayerNorm weights
    1 + N(0, 0.1) and biases N(0, 0.1), so a missed bias or a wrong LayerNorm shows in the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("LayerNorm", "ln_", "layer_norm", "layernorm")):
                p.copy_(1 + 0.1 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.1)
            else:
                p.normal_(0, std)


def build_checkpoint(path, enc="bert", dec="gpt2", *, enc_hidden=32, dec_hidden=None, layers=2, heads=2, vocab=97,
                     seed=0, std=0.3, enc_kw=None, dec_kw=None, fmt="safetensors", gen_kw=None, intermediate=None):
    """fmt: "safetensors", "sharded" (safetensors index), "bin" (pytorch_model.bin) or "legacy_bin" (the
    pre-zip torch.save format, which cannot be memory-mapped).
    Save a random EncoderDecoderModel with transformers and return the folder. Weights are drawn
    with a large std so that greedy/beam outputs are diverse (not one token repeated)."""
    import transformers as T

    dec_hidden = dec_hidden or enc_hidden
    torch.manual_seed(seed)
    ec = half_config(enc, hidden=enc_hidden, layers=layers, heads=heads, vocab=vocab, decoder=False,
                     intermediate=intermediate, **(enc_kw or {}))
    dc = half_config(dec, hidden=dec_hidden, layers=layers, heads=heads, vocab=vocab, decoder=True,
                     intermediate=intermediate, **(dec_kw or {}))
    cfg = T.EncoderDecoderConfig.from_encoder_decoder_configs(ec, dc)
    cfg.decoder_start_token_id = 3
    cfg.pad_token_id = dc.pad_token_id if dc.pad_token_id is not None else 0
    cfg.eos_token_id = 2
    model = T.EncoderDecoderModel(cfg).eval()
    perturb(model, std)
    if fmt == "sharded":
        model.save_pretrained(path, max_shard_size="30KB")
    else:
        model.save_pretrained(path)
    if fmt in ("bin", "legacy_bin"):  # transformers 5 writes safetensors only; the .bin layout is a plain state dict
        os.remove(os.path.join(path, "model.safetensors"))
        torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"),
                   _use_new_zipfile_serialization=fmt == "bin")
    if gen_kw:
        gc = T.GenerationConfig.from_pretrained(path)
        for k, v in gen_kw.items():
            setattr(gc, k, v)
        gc.save_pretrained(path)
    return path


def _transformers_at_least(version: str) -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version(version)


# transformers 5.24 changed beam sampling's random draws (one multinomial over all beams' candidates);
# earlier 5.x releases draw differently, so a seeded comparison only holds from there on
beam_sampling_draws = pytest.mark.skipif(
    not _transformers_at_least("5.24"),
    reason="beam sampling is compared with transformers >= 5.24's random draws; older releases draw differently")


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    """make_ckpt(enc="bert", dec="gpt2", **kw) -> folder; cached per argument set within the session."""
    cache = {}

    def make(enc="bert", dec="gpt2", **kw):
        key = (enc, dec, repr(sorted(kw.items())))
        if key not in cache:
            cache[key] = build_checkpoint(tmp_path_factory.mktemp(f"{enc}2{dec}"), enc, dec, **kw)
        return cache[key]

    return make


def right_padded(vocab: int, lens: list[int], seed: int = 0):
    """Random ids (>= 5) for rows of `lens` real tokens, right-padded with 0s, and their attention mask (B, max(lens))."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (len(lens), max(lens)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    return ids * mask, mask


def solo(model, ids, **kw):
    """model.generate on one input alone -> its rows as lists (seed= as torch.manual_seed before it): what
    every Engine request must equal."""
    kw = dict(kw)
    seed = kw.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(torch.tensor([ids]), **kw).tolist()


def plain(t: torch.Tensor) -> torch.Tensor:
    """A weight as a plain tensor: the CPU default packs projection weights for oneDNN (prepack.py)."""
    return t.to_dense() if t.is_mkldnn else t


def hf_model(path):
    """transformers' own EncoderDecoderModel for a folder, fp32, eval mode."""
    import transformers as T

    return T.EncoderDecoderModel.from_pretrained(str(path)).eval()


@pytest.fixture
def quiet():
    """transformers' and Python's warnings off for a test that compares outputs, not messages."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module whose tests run an engine thread beside the test's own: on the
    project's shared 2-core machines, two OpenMP teams wait on each other's descheduled threads
    (measured under load: tests/test_server.py's 100-client test took 108 s with 2 threads, 6 s with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
