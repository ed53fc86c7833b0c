"""The encoder and the decoder as transformers' EncoderDecoderModel hands them out (get_encoder(),
get_decoder()), for calling, over the model's own net; and the one check of the keyword arguments that
forward() and these calls take from transformers' signatures without using them.

  model.get_encoder()(input_ids, attention_mask)  -> BaseModelOutput(last_hidden_state (B, S, E_enc)),
      what model(encoder_outputs=..., attention_mask=..., decoder_input_ids=...) takes. The encoder runs
      on the real tokens only, so padding positions hold zeros (transformers computes values there that
      the attention mask hides); pass the same attention_mask on.
  model.get_decoder()(input_ids, encoder_hidden_states=..., encoder_attention_mask=...)
      -> CausalLMOutputWithCrossAttentions(loss, logits): the decoder with its LM head, as transformers'
      *ForCausalLM decoder; encoder_hidden_states of the decoder's width (after enc_to_dec_proj where the
      widths differ), labels scored with the next-token shift of a causal LM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import validate
from .errors import InvalidInputError, UnsupportedArgumentError

# accepted with any value: nothing to do with it (use_cache: forward keeps no cache; return_dict: read by the caller)
_ANY_VALUE = ("use_cache", "return_dict")
_FLAGS = ("output_attentions", "output_hidden_states")  # accepted while off
_NO_CACHE = ("runs the whole decoder sequence and keeps no cache: pass the full decoder_input_ids (generate() "
             "decodes incrementally)")
_WHY = {
    "cache": _NO_CACHE, "past_key_values": _NO_CACHE,
    "inputs_embeds": "pass token ids (input_ids)", "decoder_inputs_embeds": "pass token ids (decoder_input_ids)",
    "output_attentions": "attention weights are never formed (fused attention)",
    "output_hidden_states": "the layers' hidden states are not kept",
}


def check_model_kwargs(where: str, kwargs: dict, takes: str):
    """transformers' model keyword arguments that encdec_fast accepts without using: use_cache and
    return_dict with any value, output_attentions / output_hidden_states when off, anything else when None.
    Any other value raises UnsupportedArgumentError naming the arguments, why, and what `where` takes."""
    bad = sorted(k for k, v in kwargs.items() if k not in _ANY_VALUE and v is not None and not (k in _FLAGS and not v))
    if bad:
        why = "; ".join(f"{k}: {_WHY[k]}" for k in bad if k in _WHY)
        raise UnsupportedArgumentError(f"{where} does not support {bad}{f' ({why})' if why else ''}; it takes {takes}.")


def wants_dict(model, return_dict) -> bool:
    return bool(getattr(model.config, "return_dict", True)) if return_dict is None else bool(return_dict)


class EncoderView:
    """model.get_encoder(): the encoder, called as transformers' encoder is (see the module docstring)."""

    main_input_name = "input_ids"

    def __init__(self, model):
        self.model = model

    @property
    def config(self):
        return self.model.config.encoder

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, return_dict=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        check_model_kwargs("get_encoder()(...)", kwargs, "input_ids, attention_mask and token_type_ids")
        hidden, _ = self.model.encode(input_ids, attention_mask, token_type_ids)
        out = BaseModelOutput(last_hidden_state=hidden)
        return out if wants_dict(self.model, return_dict) else out.to_tuple()

    __call__ = forward

    def __repr__(self):
        return f"EncoderView({self.config.model_type}, of {self.model!r})"


class DecoderView:
    """model.get_decoder(): the decoder with its LM head, called as transformers' *ForCausalLM decoder is
    (see the module docstring)."""

    main_input_name = "input_ids"

    def __init__(self, model):
        self.model = model

    @property
    def config(self):
        return self.model.config.decoder

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.no_grad()
    def forward(self, input_ids=None, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                labels=None, return_dict=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

        m = self.model
        check_model_kwargs("get_decoder()(...)", kwargs, "input_ids, attention_mask, encoder_hidden_states, "
                           "encoder_attention_mask and labels")
        if encoder_hidden_states is None:
            raise InvalidInputError("the decoder's cross-attention needs encoder_hidden_states: pass "
                                    "model.get_encoder()(input_ids, attention_mask).last_hidden_state (and "
                                    "encoder_attention_mask=attention_mask), or call the model itself.")
        width = m.cfg.decoder.hidden_size
        enc = validate.encoder_outputs(encoder_hidden_states, width, "encoder_hidden_states")
        enc = enc.to(device=m.device, dtype=m.dtype)
        enc_mask = validate.attention_mask(encoder_attention_mask, enc.shape[:2], "encoder_attention_mask")
        ids = validate.token_ids(input_ids, "input_ids", m.cfg.decoder).to(m.device)
        if ids.shape[0] != enc.shape[0]:
            raise InvalidInputError(f"input_ids has batch {ids.shape[0]} but encoder_hidden_states has {enc.shape[0]}.")
        mask = validate.attention_mask(attention_mask, ids.shape, "attention_mask")
        logits = m.decoder_logits(ids, mask.to(m.device) if mask is not None else None, enc,
                                  enc_mask.to(m.device) if enc_mask is not None else None)
        loss = None
        if labels is not None:  # a causal LM's loss: position t predicts label t + 1
            labels = validate.labels(labels, m.cfg.decoder, ids.shape[0]).to(m.device)
            if labels.shape != ids.shape:
                raise InvalidInputError(f"labels have shape {tuple(labels.shape)} but input_ids {tuple(ids.shape)}; "
                                        "they must match.")
            target = F.pad(labels, (0, 1), value=validate.IGNORE_INDEX)[:, 1:]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                   ignore_index=validate.IGNORE_INDEX)
        out = CausalLMOutputWithCrossAttentions(loss=loss, logits=logits)
        return out if wants_dict(m, return_dict) else out.to_tuple()

    __call__ = forward

    def __repr__(self):
        return f"DecoderView({self.config.model_type}, of {self.model!r})"


def transition_scores(model, sequences, scores, beam_indices=None, normalize_logits: bool = False):
    """model.compute_transition_scores(): transformers' GenerationMixin.compute_transition_scores (which reads
    model.config only) on generate()'s outputs, once they are checked to be such outputs."""
    from transformers.generation.utils import GenerationMixin

    fix = ("pass the .sequences, .scores (and .beam_indices) of generate(..., return_dict_in_generate=True, "
           "output_scores=True)")
    V = model.cfg.decoder.vocab_size
    if (not isinstance(scores, (tuple, list)) or not scores or not all(isinstance(s, torch.Tensor) for s in scores)
            or any(s.dim() != 2 or s.shape != scores[0].shape or s.shape[-1] != V for s in scores)):
        raise InvalidInputError(f"scores must be a non-empty tuple of (rows, {V}) tensors, one per generated "
                                f"token; {fix}.")
    if (not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 or sequences.is_floating_point()
            or sequences.shape[1] < len(scores)):
        raise InvalidInputError(f"sequences must be the 2-D token ids that came with these {len(scores)} scores; "
                                f"{fix}.")
    if beam_indices is None and scores[0].shape[0] != sequences.shape[0]:
        raise InvalidInputError(f"scores have {scores[0].shape[0]} rows but sequences {sequences.shape[0]}: these "
                                "are beam search scores; pass beam_indices=outputs.beam_indices.")
    if beam_indices is not None and (not isinstance(beam_indices, torch.Tensor) or beam_indices.dim() != 2
                                     or beam_indices.shape[0] != sequences.shape[0]):
        raise InvalidInputError(f"beam_indices must be a (rows, length) tensor with a row per sequence; {fix}.")
    return GenerationMixin.compute_transition_scores(model, sequences, scores, beam_indices, normalize_logits)
