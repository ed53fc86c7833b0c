"""A normalised, frozen description of the two halves of an EncoderDecoderModel checkpoint.

Reads the transformers config objects (BertConfig, RobertaConfig, XLMRobertaConfig, CamembertConfig,
BertGenerationConfig, ElectraConfig, GPT2Config, BartConfig) and keeps only what the net needs, as
layer options (modules.py never asks which family it runs), refusing every option that would change
the numbers and that we do not implement.

Families (the architecture; several model_types share one):
  bert             word + position + token type embeddings, LayerNorm; post-LN layers; head
                   dense -> act -> LayerNorm -> vocab (+ bias)
  roberta          (roberta, xlm-roberta, camembert) BERT with positions from padding_idx + 1 that skip
                   pad tokens; head activation is always erf gelu
  bert-generation  BERT without token types; head is one vocab projection with bias
  electra          BERT whose embeddings may be narrower than the hidden size (then projected); head
                   dense (hidden -> embedding size) -> erf gelu -> LayerNorm -> vocab (+ bias)
  gpt2             pre-LN blocks, final ln_f, head tied to wte without bias
  bart             (decoder only: BartForCausalLM) embeddings scaled by sqrt(d_model) when
                   scale_embedding, learned positions offset by 2, layernorm_embedding, post-LN layers
                   with their own cross-attention, head without bias; every LayerNorm eps 1e-5
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedModelError

# model_type -> family
_BERT_LIKE = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "camembert": "roberta",
              "bert-generation": "bert-generation", "electra": "electra"}
ENCODER_TYPES = tuple(_BERT_LIKE)
DECODER_TYPES = (*_BERT_LIKE, "gpt2", "bart")

# refused model_types whose reason is worth naming
_WHY_NOT = {
    "prophetnet": "ProphetNet predicts n-gram streams with its own decoder",
    "xlm-prophetnet": "XLM-ProphetNet predicts n-gram streams with its own decoder",
}

# hidden_act -> F.gelu(approximate=...)
_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
BART_LN_EPS = 1e-5  # nn.LayerNorm's default, which every BART LayerNorm uses


@dataclass(frozen=True)
class StackConfig:
    family: str  # "bert" | "roberta" | "bert-generation" | "electra" | "gpt2" | "bart" (see the module docstring)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int  # rows of the position table
    layer_norm_eps: float
    gelu: str  # "none" (erf) or "tanh"
    model_type: str = ""  # as config.json names it (xlm-roberta, camembert run as family "roberta")
    is_decoder: bool = False
    cross_attention: bool = False
    pre_ln: bool = False  # gpt2: LayerNorm before each sublayer and a final ln_f; else post-LN (BertLayer)
    embedding_size: int = 0  # width of the embedding tables when it differs from hidden_size (electra); 0: same
    embed_scale: float = 1.0  # bart scale_embedding: word embeddings times sqrt(d_model)
    embed_ln: bool = True  # a LayerNorm over the summed embeddings (all but gpt2)
    type_vocab_size: int = 0  # token-type embeddings (bert, roberta, electra); 0: none
    pad_token_id: int | None = None
    position_offset: int = 0  # table row of position 0: roberta pad_token_id + 1, bart 2
    positions_skip_pad: bool = False  # roberta: pad tokens take row pad_token_id and do not count
    scale_attn_weights: bool = True  # gpt2
    scale_attn_by_inverse_layer_idx: bool = False  # gpt2
    tie_word_embeddings: bool = True
    head_transform: bool = False  # dense -> gelu -> LayerNorm before the vocab projection (bert, roberta, electra)
    head_gelu: str = "none"  # that gelu
    head_bias: bool = False  # a bias on the vocab projection

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embed_dim(self) -> int:
        """Width of the word/position/type tables (and of a transformed head's vocab projection)."""
        return self.embedding_size or self.hidden_size

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


def _refuse_model_type(mt, role: str):
    supported = ENCODER_TYPES if role == "encoder" else DECODER_TYPES
    why = f" ({_WHY_NOT[mt]})" if mt in _WHY_NOT else ""
    raise UnsupportedModelError(
        f"{role} model_type {mt!r} is not supported{why}; supported {role}s: {', '.join(supported)}. "
        "(T5, BART, Marian and other native seq2seq models are not EncoderDecoderModel checkpoints; "
        "run them with transformers.)"
    )


def _gpt2(cfg, where: str) -> StackConfig:
    _refuse(getattr(cfg, "n_inner", None) is not None and cfg.n_inner <= 0, where, "n_inner <= 0")
    return StackConfig(
        family="gpt2",
        model_type="gpt2",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        num_layers=cfg.n_layer,
        num_heads=cfg.n_head,
        intermediate_size=cfg.n_inner if cfg.n_inner is not None else 4 * cfg.n_embd,
        max_positions=cfg.n_positions,
        layer_norm_eps=cfg.layer_norm_epsilon,
        gelu=_gelu(cfg.activation_function, where),
        is_decoder=True,
        cross_attention=True,
        pre_ln=True,
        embed_ln=False,
        scale_attn_weights=bool(cfg.scale_attn_weights),
        scale_attn_by_inverse_layer_idx=bool(cfg.scale_attn_by_inverse_layer_idx),
        # reorder_and_upcast_attn only upcasts to fp32, which our attention always does.
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
    )


def _bart_decoder(cfg, where: str) -> StackConfig:
    """BartForCausalLM: BART's decoder stack (its encoder_* fields are ignored)."""
    d = cfg.d_model
    return StackConfig(
        family="bart",
        model_type="bart",
        vocab_size=cfg.vocab_size,
        hidden_size=d,
        num_layers=cfg.decoder_layers,
        num_heads=cfg.decoder_attention_heads,
        intermediate_size=cfg.decoder_ffn_dim,
        max_positions=cfg.max_position_embeddings + 2,  # BartLearnedPositionalEmbedding's offset rows
        layer_norm_eps=BART_LN_EPS,
        gelu=_gelu(cfg.activation_function, where),
        is_decoder=True,
        cross_attention=True,
        embed_scale=d**0.5 if cfg.scale_embedding else 1.0,
        pad_token_id=cfg.pad_token_id,
        position_offset=2,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
    )


def _bert_like(cfg, family: str, role: str, where: str) -> StackConfig:
    pet = getattr(cfg, "position_embedding_type", "absolute") or "absolute"
    _refuse(pet != "absolute", where, f"position_embedding_type={pet!r} (relative position embeddings)")
    emb = getattr(cfg, "embedding_size", None) or cfg.hidden_size
    _refuse(emb != cfg.hidden_size and family != "electra", where, "embedding_size != hidden_size")
    act = _gelu(cfg.hidden_act, where)
    pad = cfg.pad_token_id
    if family == "roberta" and pad is None:
        raise UnsupportedModelError(f"{where}: RoBERTa needs pad_token_id for its position ids; set it in config.json.")
    types = getattr(cfg, "type_vocab_size", 0) if family != "bert-generation" else 0
    return StackConfig(
        family=family,
        model_type=cfg.model_type,
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
        embedding_size=emb if emb != cfg.hidden_size else 0,
        type_vocab_size=types,
        pad_token_id=pad,
        position_offset=(pad + 1) if family == "roberta" else 0,
        positions_skip_pad=family == "roberta",
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
        head_transform=family != "bert-generation",
        # BERT's head uses hidden_act; RoBERTa's and ELECTRA's generator head call erf gelu whatever hidden_act says
        head_gelu=act if family == "bert" else "none",
        head_bias=True,
    )


def normalise(cfg, *, role: str) -> StackConfig:
    """Map a transformers sub-config to a StackConfig. role is "encoder" or "decoder"."""
    mt = getattr(cfg, "model_type", None)
    if mt not in (ENCODER_TYPES if role == "encoder" else DECODER_TYPES):
        _refuse_model_type(mt, role)
    where = f"{role} ({mt})"
    if role == "decoder" and mt != "bart":  # BartForCausalLM always is a causal decoder with cross-attention
        if not getattr(cfg, "is_decoder", False) or not getattr(cfg, "add_cross_attention", False):
            raise UnsupportedModelError(
                f"{where}: the decoder config must have is_decoder=True and add_cross_attention=True "
                "(as EncoderDecoderModel.from_encoder_decoder_pretrained sets); fix config.json."
            )
    if mt == "gpt2":
        h = _gpt2(cfg, where)
    elif mt == "bart":
        h = _bart_decoder(cfg, where)
    else:
        h = _bert_like(cfg, _BERT_LIKE[mt], role, where)
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
