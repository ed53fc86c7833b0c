"""The name table: which Hugging Face tensors fill each of our buffers, and how they are combined.

Our layout is the fast path's: fused QKV (BERT's query/key/value and BART's q/k/v_proj concatenated,
GPT-2's Conv1D c_attn transposed to nn.Linear's [out, in]), cross-attention K/V fused. A plan maps each
buffer name of modules.EncoderDecoderNet to (HF names, combine function); sources.py and assign.py read the
tensors and fills the buffers. Standalone checkpoints (glued with load(encoder=, decoder=)) are first
mapped onto the EncoderDecoderModel names by alias().
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import ModelConfig, StackConfig

# tensors a checkpoint may hold that the inference net does not use
_IGNORED_SUFFIXES = (".position_ids", ".token_type_ids", "attn.bias", "attn.masked_bias",
                     "crossattention.bias", "crossattention.masked_bias")
_IGNORED_PARTS = ("pooler.", "cls.seq_relationship.", "lm_head.decoder.bias", "cls.predictions.decoder.bias",
                  "lm_head.bias", "cls.predictions.bias")

# a decoder's base model inside its ForCausalLM class (in an EncoderDecoderModel: "decoder." + this)
DECODER_BASE = {"gpt2": "transformer.", "bert": "bert.", "roberta": "roberta.", "bert-generation": "bert.",
                "electra": "electra.", "bart": "model.decoder."}
# a standalone encoder checkpoint may be a base model (no prefix) or a model with a head (prefix + head)
ENCODER_BASES = ("bert.", "roberta.", "electra.")
ENCODER_HEADS = ("cls.", "lm_head.", "discriminator_predictions.", "generator_predictions.", "generator_lm_head.")

# decoder heads, relative to the ForCausalLM: (transform dense, transform LayerNorm, vocab matrix,
# vocab biases in order of preference: the projection's own bias is what forward adds; transformers ties
# it to the second name, which is all a tied transformers-5 save keeps)
_HEADS = {
    "bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.decoder.weight",
             ("cls.predictions.decoder.bias", "cls.predictions.bias")),
    "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder.weight", ("lm_head.decoder.bias", "lm_head.bias")),
    "electra": ("generator_predictions.dense", "generator_predictions.LayerNorm", "generator_lm_head.weight",
                ("generator_lm_head.bias",)),
    "bert-generation": (None, None, "lm_head.decoder.weight", ("lm_head.decoder.bias", "lm_head.bias")),
    "gpt2": (None, None, "lm_head.weight", ()),
    "bart": (None, None, "lm_head.weight", ()),
}
# first component of every head name above: what a standalone decoder checkpoint holds besides its base
DECODER_HEADS = ("cls.", "lm_head.", "generator_predictions.", "generator_lm_head.")


# ------------------------------------------------------------------------------------------------
# plans: our buffer name -> (HF names, how to combine them)
# ------------------------------------------------------------------------------------------------
def same(t):
    """The tensor as stored (a view of the checkpoint: never copied unless the dtype changes)."""
    return t


def _cat(*ts):
    return torch.cat(ts, 0)


def _t(t):  # GPT-2 Conv1D [in, out] -> nn.Linear [out, in]
    return t.t()


Plan = dict[str, tuple[list[str], Callable]]


def _linear(plan: Plan, ours: str, hf: list[str], fn=None):
    if fn is None:
        fn = _cat if len(hf) > 1 else same
    plan[f"{ours}.weight"] = ([f"{h}.weight" for h in hf], fn)
    plan[f"{ours}.bias"] = ([f"{h}.bias" for h in hf], _cat if len(hf) > 1 else same)


def _ln(plan: Plan, ours: str, hf: str):
    plan[f"{ours}.weight"] = ([f"{hf}.weight"], same)
    plan[f"{ours}.bias"] = ([f"{hf}.bias"], same)


def _one(plan: Plan, ours: str, hf: str):
    plan[ours] = ([hf], same)


# a post-LN layer's tensors: our name -> the HF sub-names (several: concatenated), per family
_BERT_LAYER = {
    "attn.qkv": ["attention.self.query", "attention.self.key", "attention.self.value"],
    "attn.o": ["attention.output.dense"], "ln1": "attention.output.LayerNorm",
    "cross.q": ["crossattention.self.query"], "cross.kv": ["crossattention.self.key", "crossattention.self.value"],
    "cross.o": ["crossattention.output.dense"], "ln_cross": "crossattention.output.LayerNorm",
    "mlp.fc1": ["intermediate.dense"], "mlp.fc2": ["output.dense"], "ln2": "output.LayerNorm",
}
_BART_LAYER = {
    "attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "attn.o": ["self_attn.out_proj"], "ln1": "self_attn_layer_norm",
    "cross.q": ["encoder_attn.q_proj"], "cross.kv": ["encoder_attn.k_proj", "encoder_attn.v_proj"],
    "cross.o": ["encoder_attn.out_proj"], "ln_cross": "encoder_attn_layer_norm",
    "mlp.fc1": ["fc1"], "mlp.fc2": ["fc2"], "ln2": "final_layer_norm",
}


def _post_ln_layer(plan: Plan, hf: str, ours: str, names: dict, cross: bool):
    """One post-LN layer (BertLayer): its linears (list values) and LayerNorms (str values), cross-attention's
    only when the stack has it."""
    for mine, theirs in names.items():
        if not cross and mine.startswith(("cross.", "ln_cross")):
            continue
        if isinstance(theirs, list):
            _linear(plan, ours + mine, [hf + n for n in theirs])
        else:
            _ln(plan, ours + mine, hf + theirs)


def _bert_plan(cfg: StackConfig, ours: str, base: str) -> Plan:
    """BERT-like body (bert, roberta, bert-generation, electra). base: HF prefix of the base model
    ("encoder." or "decoder.bert.")."""
    plan: Plan = {}
    e = f"{base}embeddings."
    _one(plan, f"{ours}embed.word", e + "word_embeddings.weight")
    _one(plan, f"{ours}embed.position", e + "position_embeddings.weight")
    if cfg.type_vocab_size:
        _one(plan, f"{ours}embed.token_type", e + "token_type_embeddings.weight")
    _ln(plan, f"{ours}embed.ln", e + "LayerNorm")
    if cfg.embedding_size:
        _linear(plan, f"{ours}embed.proj", [f"{base}embeddings_project"])
    for i in range(cfg.num_layers):
        _post_ln_layer(plan, f"{base}encoder.layer.{i}.", f"{ours}layers.{i}.", _BERT_LAYER, cfg.cross_attention)
    return plan


def _bart_plan(cfg: StackConfig, ours: str, base: str) -> Plan:
    """BART's decoder stack (post-LN, the same layer as BERT's under other names)."""
    plan: Plan = {}
    _one(plan, f"{ours}embed.word", base + "embed_tokens.weight")
    _one(plan, f"{ours}embed.position", base + "embed_positions.weight")
    _ln(plan, f"{ours}embed.ln", base + "layernorm_embedding")
    for i in range(cfg.num_layers):
        _post_ln_layer(plan, f"{base}layers.{i}.", f"{ours}layers.{i}.", _BART_LAYER, True)
    return plan


def _gpt2_plan(cfg: StackConfig, ours: str, base: str) -> Plan:
    plan: Plan = {}
    _one(plan, f"{ours}embed.word", base + "wte.weight")
    _one(plan, f"{ours}embed.position", base + "wpe.weight")
    for i in range(cfg.num_layers):
        L, o = f"{base}h.{i}.", f"{ours}layers.{i}."
        _ln(plan, o + "ln1", L + "ln_1")
        _linear(plan, o + "attn.qkv", [L + "attn.c_attn"], _t)
        _linear(plan, o + "attn.o", [L + "attn.c_proj"], _t)
        _ln(plan, o + "ln_cross", L + "ln_cross_attn")
        _linear(plan, o + "cross.q", [L + "crossattention.q_attn"], _t)
        _linear(plan, o + "cross.kv", [L + "crossattention.c_attn"], _t)
        _linear(plan, o + "cross.o", [L + "crossattention.c_proj"], _t)
        _ln(plan, o + "ln2", L + "ln_2")
        _linear(plan, o + "mlp.fc1", [L + "mlp.c_fc"], _t)
        _linear(plan, o + "mlp.fc2", [L + "mlp.c_proj"], _t)
    _ln(plan, f"{ours}ln_f", base + "ln_f")
    return plan


def word_embeddings(cfg: StackConfig, base: str) -> str:
    """HF name of a stack's word embedding matrix, under base."""
    return base + {"gpt2": "wte.weight", "bart": "embed_tokens.weight"}.get(cfg.family, "embeddings.word_embeddings.weight")


def decoder_plan(cfg: StackConfig, prefix: str, keys: set[str]) -> Plan:
    """The decoder's plan, head included. prefix: "decoder." in an EncoderDecoderModel; keys: the
    names the checkpoint holds (a head matrix or bias absent from them is the tied one)."""
    base = prefix + DECODER_BASE[cfg.family]
    body = {"gpt2": _gpt2_plan, "bart": _bart_plan}.get(cfg.family, _bert_plan)
    plan = body(cfg, "decoder.", base)
    dense, ln, matrix, biases = _HEADS[cfg.family]
    if dense is not None:
        _linear(plan, "decoder.head.dense", [prefix + dense])
        _ln(plan, "decoder.head.ln", prefix + ln)
    # transformers 5 keeps a head matrix stored in the checkpoint even when the config ties it (the
    # loader shares the two tensors again when they are equal); only a missing one is tied
    tied = cfg.tie_word_embeddings
    matrix = prefix + matrix
    _one(plan, "decoder.head.weight", matrix if matrix in keys or not tied else word_embeddings(cfg, base))
    if biases:
        own, *shared = [prefix + b for b in biases]
        _one(plan, "decoder.head.bias", shared[0] if shared and tied and own not in keys else own)
    return plan


def full_plan(cfg: ModelConfig, keys: set[str]) -> Plan:
    """The whole EncoderDecoderModel's plan; keys: the tensor names the checkpoint holds."""
    plan = _bert_plan(cfg.encoder, "encoder.", "encoder.")
    plan.update(decoder_plan(cfg.decoder, "decoder.", keys))
    if cfg.has_enc_to_dec_proj:
        _linear(plan, "enc_to_dec_proj", ["enc_to_dec_proj"])
    return plan


def ignorable(name: str) -> bool:
    return name.endswith(_IGNORED_SUFFIXES) or any(p in name for p in _IGNORED_PARTS)


def missing_and_unexpected(plan: Plan, keys: set[str]) -> tuple[list[str], list[str]]:
    needed = {h for names, _ in plan.values() for h in names}
    missing = sorted(needed - keys)
    unexpected = sorted(k for k in keys - needed if not ignorable(k))
    return missing, unexpected


def alias(keys: set[str], strip: tuple[str, ...], canon: str, extra: tuple[str, ...], extra_canon: str) -> dict[str, str]:
    """Map canonical EncoderDecoderModel names onto a standalone checkpoint's names: a name starting
    with one of `extra` (a head) becomes extra_canon + name, any other loses its `strip` prefix (if it has
    one) and becomes canon + the rest."""
    out = {}
    for k in keys:
        if k.startswith(extra):
            out[extra_canon + k] = k
            continue
        rest = k
        for s in strip:
            if rest.startswith(s):
                rest = rest[len(s):]
                break
        out[canon + rest] = k
    return out


def source_key(hf_names, fn):
    """A buffer's source: buffers with the same key and fn `same` share one tensor (read once); any other
    transform is read and computed per buffer."""
    return tuple(hf_names), fn.__name__
