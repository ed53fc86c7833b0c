"""The name table: which Hugging Face tensors fill each of our buffers, and how they are combined.

Our layout is the fast path's: fused QKV (BERT's query/key/value concatenated, GPT-2's Conv1D c_attn
transposed to nn.Linear's [out, in]), cross-attention K/V fused. A plan maps each buffer name of
modules.EncoderDecoderNet to (HF names, combine function); checkpoint.py reads the tensors and fills
the buffers. Standalone checkpoints (glued with load(encoder=, decoder=)) are first mapped onto the
EncoderDecoderModel names by alias().
"""

from __future__ import annotations

from typing import Callable

import torch

from .config import ModelConfig, StackConfig

# tensors a checkpoint may hold that the inference net does not use
_IGNORED_SUFFIXES = (".position_ids", ".token_type_ids", "attn.bias", "attn.masked_bias",
                     "crossattention.bias", "crossattention.masked_bias")
_IGNORED_PARTS = ("pooler.", "cls.seq_relationship.", "lm_head.decoder.bias", "cls.predictions.decoder.bias")


# ------------------------------------------------------------------------------------------------
# plans: our buffer name -> (HF names, how to combine them)
# ------------------------------------------------------------------------------------------------
def _cat(*ts):
    return torch.cat(ts, 0)


def _t(t):  # GPT-2 Conv1D [in, out] -> nn.Linear [out, in]
    return t.t()


def _row0(t):
    return t[0]


Plan = dict[str, tuple[list[str], Callable]]


def _linear(plan: Plan, ours: str, hf: list[str], fn=None):
    if fn is None:
        fn = _cat if len(hf) > 1 else (lambda t: t)
    plan[f"{ours}.weight"] = ([f"{h}.weight" for h in hf], fn)
    plan[f"{ours}.bias"] = ([f"{h}.bias" for h in hf], _cat if len(hf) > 1 else (lambda t: t))


def _ln(plan: Plan, ours: str, hf: str):
    plan[f"{ours}.weight"] = ([f"{hf}.weight"], lambda t: t)
    plan[f"{ours}.bias"] = ([f"{hf}.bias"], lambda t: t)


def _bert_plan(cfg: StackConfig, ours: str, base: str) -> Plan:
    """BERT/RoBERTa body. base: HF prefix of the base model ("encoder." or "decoder.bert.")."""
    plan: Plan = {}
    e = f"{base}embeddings."
    plan[f"{ours}embed.word"] = ([e + "word_embeddings.weight"], lambda t: t)
    plan[f"{ours}embed.position"] = ([e + "position_embeddings.weight"], lambda t: t)
    plan[f"{ours}embed.type0"] = ([e + "token_type_embeddings.weight"], _row0)
    _ln(plan, f"{ours}embed.ln", e + "LayerNorm")
    for i in range(cfg.num_layers):
        L, o = f"{base}encoder.layer.{i}.", f"{ours}layers.{i}."
        _linear(plan, o + "attn.qkv", [L + "attention.self.query", L + "attention.self.key", L + "attention.self.value"])
        _linear(plan, o + "attn.o", [L + "attention.output.dense"])
        _ln(plan, o + "ln1", L + "attention.output.LayerNorm")
        if cfg.cross_attention:
            _linear(plan, o + "cross.q", [L + "crossattention.self.query"])
            _linear(plan, o + "cross.kv", [L + "crossattention.self.key", L + "crossattention.self.value"])
            _linear(plan, o + "cross.o", [L + "crossattention.output.dense"])
            _ln(plan, o + "ln_cross", L + "crossattention.output.LayerNorm")
        _linear(plan, o + "mlp.fc1", [L + "intermediate.dense"])
        _linear(plan, o + "mlp.fc2", [L + "output.dense"])
        _ln(plan, o + "ln2", L + "output.LayerNorm")
    return plan


def _gpt2_plan(cfg: StackConfig, ours: str, base: str) -> Plan:
    plan: Plan = {}
    plan[f"{ours}embed.word"] = ([base + "wte.weight"], lambda t: t)
    plan[f"{ours}embed.position"] = ([base + "wpe.weight"], lambda t: t)
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


def decoder_plan(cfg: StackConfig, prefix: str) -> tuple[Plan, str, str]:
    """The decoder's plan, plus the HF names of its own LM-head matrix and of the word embeddings."""
    if cfg.family == "gpt2":
        plan = _gpt2_plan(cfg, "decoder.", prefix + "transformer.")
        return plan, prefix + "lm_head.weight", prefix + "transformer.wte.weight"
    fam = cfg.family
    plan = _bert_plan(cfg, "decoder.", f"{prefix}{fam}.")
    head = f"{prefix}cls.predictions." if fam == "bert" else f"{prefix}lm_head."
    if fam == "bert":
        _linear(plan, "decoder.head.dense", [head + "transform.dense"])
        _ln(plan, "decoder.head.ln", head + "transform.LayerNorm")
    else:
        _linear(plan, "decoder.head.dense", [head + "dense"])
        _ln(plan, "decoder.head.ln", head + "layer_norm")
    plan["decoder.head.bias"] = ([head + "bias"], lambda t: t)
    return plan, head + "decoder.weight", f"{prefix}{fam}.embeddings.word_embeddings.weight"


def full_plan(cfg: ModelConfig, keys: set[str]) -> Plan:
    """The whole EncoderDecoderModel's plan; keys: the tensor names the checkpoint holds."""
    plan = _bert_plan(cfg.encoder, "encoder.", "encoder.")
    dplan, head_w, word_w = decoder_plan(cfg.decoder, "decoder.")
    plan.update(dplan)
    # transformers 5 keeps a head matrix stored in the checkpoint even when the config ties it (the
    # loader shares the two tensors again when they are equal); only a missing one is tied
    if head_w in keys or not cfg.decoder.tie_word_embeddings:
        plan["decoder.head.weight"] = ([head_w], lambda t: t)
    else:
        plan["decoder.head.weight"] = ([word_w], lambda t: t)
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


def alias(keys: set[str], strip: tuple[str, ...], canon: str, extra: dict[str, str]) -> dict[str, str]:
    """Map canonical EncoderDecoderModel names onto a standalone checkpoint's names."""
    out = {}
    for k in keys:
        for head, target in extra.items():
            if k.startswith(head):
                out[target + k[len(head):]] = k
                break
        else:
            rest = k
            for s in strip:
                if rest.startswith(s):
                    rest = rest[len(s):]
                    break
            out[canon + rest] = k
    return out
