"""A normalised, frozen description of the two halves of an EncoderDecoderModel checkpoint.

Reads the transformers config objects (BertConfig, RobertaConfig, GPT2Config) and keeps only what
the net needs, refusing every option that would change the numbers and that we do not implement.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedModelError

ENCODER_FAMILIES = ("bert", "roberta")
DECODER_FAMILIES = ("bert", "roberta", "gpt2")

# hidden_act -> F.gelu(approximate=...)
_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


@dataclass(frozen=True)
class StackConfig:
    family: str  # "bert" | "roberta" | "gpt2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    layer_norm_eps: float
    gelu: str  # "none" (erf) or "tanh"
    is_decoder: bool = False
    cross_attention: bool = False
    type_vocab_size: int = 0  # bert/roberta token-type embeddings (we always use type 0)
    pad_token_id: int | None = None
    position_offset: int = 0  # roberta: positions start at pad_token_id + 1
    scale_attn_weights: bool = True  # gpt2
    scale_attn_by_inverse_layer_idx: bool = False  # gpt2
    tie_word_embeddings: bool = True
    head_gelu: str = "none"  # bert/roberta LM head transform activation

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_length(self) -> int:
        """Longest sequence the position table allows."""
        return self.max_positions - self.position_offset

    def attn_scale(self, layer: int) -> float:
        scale = self.head_dim**-0.5 if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            scale /= float(layer + 1)
        return scale


def _gelu(name, where):
    if name not in _GELU:
        raise UnsupportedModelError(
            f"{where}: activation {name!r} is not supported; encdec_fast implements {sorted(_GELU)}. "
            "Use a checkpoint with one of those activations or run it with transformers."
        )
    return _GELU[name]


def _refuse(cond, where, what):
    if cond:
        raise UnsupportedModelError(f"{where}: {what} is not supported by encdec_fast; run this checkpoint with transformers.")


def normalise(cfg, *, role: str) -> StackConfig:
    """Map a transformers sub-config to a StackConfig. role is "encoder" or "decoder"."""
    mt = getattr(cfg, "model_type", None)
    families = ENCODER_FAMILIES if role == "encoder" else DECODER_FAMILIES
    where = f"{role} ({mt})"
    if mt not in families:
        raise UnsupportedModelError(
            f"{role} model_type {mt!r} is not supported; supported {role}s: {', '.join(families)}. "
            "(T5, BART, Marian and other native seq2seq models are not EncoderDecoderModel checkpoints.)"
        )
    if role == "decoder":
        if not getattr(cfg, "is_decoder", False) or not getattr(cfg, "add_cross_attention", False):
            raise UnsupportedModelError(
                f"{where}: the decoder config must have is_decoder=True and add_cross_attention=True "
                "(as EncoderDecoderModel.from_encoder_decoder_pretrained sets); fix config.json."
            )
    if mt == "gpt2":
        _refuse(getattr(cfg, "n_inner", None) is not None and cfg.n_inner <= 0, where, "n_inner <= 0")
        act = _gelu(cfg.activation_function, where)
        h = StackConfig(
            family="gpt2",
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.n_embd,
            num_layers=cfg.n_layer,
            num_heads=cfg.n_head,
            intermediate_size=cfg.n_inner if cfg.n_inner is not None else 4 * cfg.n_embd,
            max_positions=cfg.n_positions,
            layer_norm_eps=cfg.layer_norm_epsilon,
            gelu=act,
            is_decoder=True,
            cross_attention=True,
            scale_attn_weights=bool(cfg.scale_attn_weights),
            scale_attn_by_inverse_layer_idx=bool(cfg.scale_attn_by_inverse_layer_idx),
            # reorder_and_upcast_attn only upcasts to fp32, which our attention always does.
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
        )
    else:
        pet = getattr(cfg, "position_embedding_type", "absolute") or "absolute"
        _refuse(pet != "absolute", where, f"position_embedding_type={pet!r}")
        _refuse(getattr(cfg, "embedding_size", cfg.hidden_size) != cfg.hidden_size, where, "embedding_size != hidden_size")
        act = _gelu(cfg.hidden_act, where)
        pad = cfg.pad_token_id
        if mt == "roberta" and pad is None:
            raise UnsupportedModelError(f"{where}: RoBERTa needs pad_token_id for its position ids; set it in config.json.")
        h = StackConfig(
            family=mt,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size,
            max_positions=cfg.max_position_embeddings,
            layer_norm_eps=cfg.layer_norm_eps,
            gelu=act,
            is_decoder=role == "decoder",
            cross_attention=role == "decoder",
            type_vocab_size=cfg.type_vocab_size,
            pad_token_id=pad,
            position_offset=(pad + 1) if mt == "roberta" else 0,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
            head_gelu=act,
        )
    if h.hidden_size % h.num_heads:
        raise UnsupportedModelError(f"{where}: hidden size {h.hidden_size} is not a multiple of {h.num_heads} heads; fix config.json.")
    return h


@dataclass(frozen=True)
class ModelConfig:
    encoder: StackConfig
    decoder: StackConfig
    has_enc_to_dec_proj: bool
    tie_encoder_decoder: bool


def from_hf(config) -> ModelConfig:
    """Normalise a transformers EncoderDecoderConfig."""
    enc = normalise(config.encoder, role="encoder")
    dec = normalise(config.decoder, role="decoder")
    cross = getattr(config.decoder, "cross_attention_hidden_size", None)
    if cross is not None and cross != enc.hidden_size:
        raise UnsupportedModelError(
            f"decoder cross_attention_hidden_size={cross} differs from the encoder hidden size {enc.hidden_size}; "
            "transformers refuses this too. Fix config.json."
        )
    _refuse(cross is not None and enc.hidden_size != dec.hidden_size, "decoder",
            "cross_attention_hidden_size with encoder width != decoder width")
    return ModelConfig(
        encoder=enc,
        decoder=dec,
        has_enc_to_dec_proj=enc.hidden_size != dec.hidden_size and cross is None,
        tie_encoder_decoder=bool(getattr(config, "tie_encoder_decoder", False)),
    )
