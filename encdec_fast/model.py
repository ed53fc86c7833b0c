"""load() and the drop-in model object it returns."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import ops as ops_mod
from .config import ModelConfig
from .errors import InvalidInputError, UnsupportedArgumentError
from .modules import EncoderDecoderNet
from .packing import Packing

_FORWARD_IGNORED = {"use_cache", "return_dict", "output_attentions", "output_hidden_states"}


def _pick_device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UnsupportedArgumentError(f"device={device!r} is not a torch device ({e}); use 'cpu' or 'cuda'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedArgumentError(f"device={device!r} asks for CUDA, but this torch build or machine has no CUDA "
                                       "device; use device='cpu' (or install a CUDA build of torch).")
    if dev.type not in ("cpu", "cuda"):
        raise UnsupportedArgumentError(f"device={device!r}: encdec_fast runs on 'cpu' and 'cuda' devices only.")
    return dev


def _pick_backend(backend, device):
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    if backend not in ops_mod.BACKENDS:
        raise UnsupportedArgumentError(f"backend={backend!r} is not known; use one of {ops_mod.BACKENDS}.")
    if backend == "triton" and device.type != "cuda":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise UnsupportedArgumentError(
                "backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 set before triton is imported, "
                "for testing on the CPU); use backend='torch' on the CPU."
            )
    return backend


def _pick_dtype(dtype, stored: torch.dtype, device):
    if dtype is None:
        return torch.float32 if device.type == "cpu" else stored
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}.get(dtype, dtype)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UnsupportedArgumentError(f"dtype={dtype!r} is not supported; use torch.float32, torch.float16 or torch.bfloat16.")
    return dtype


class EncDecModel:
    """Drop-in for transformers' EncoderDecoderModel at inference: forward(), generate(), config."""

    def __init__(self, net: EncoderDecoderNet, hf_config, generation_config, backend: str, path=None):
        self.net = net
        self.cfg: ModelConfig = net.cfg
        self.config = hf_config
        self.generation_config = generation_config
        self.backend = backend
        self.ops = ops_mod.table(backend)
        self.path = path
        self.cuda_graphs = True  # capture the decode step as a CUDA graph on CUDA devices
        self.static_decode = False  # the bucketed static-buffer step without capture (tests it on the CPU)
        self._graph_cache = None

    @property
    def graph_cache(self):
        """Captured decode steps (CUDA only), reused across generate() calls of the same shapes."""
        if self._graph_cache is None:
            from .decode.state import GraphCache

            self._graph_cache = GraphCache()
        return self._graph_cache

    # -- torch-like ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.net.encoder.embed.word.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.encoder.embed.word.dtype

    def to(self, device=None, dtype=None, *, backend=None):
        dev = _pick_device(device) if device is not None else self.device
        if dtype is not None:
            dtype = _pick_dtype(dtype, self.dtype, dev)
        # a new device type gets its default backend unless one is named
        new_backend = _pick_backend(backend, dev) if (backend or dev.type != self.device.type) else self.backend
        self.net.to(device=dev, dtype=dtype)
        self._graph_cache = None  # captured graphs point at the old tensors
        self.backend, self.ops = new_backend, ops_mod.table(new_backend)
        return self

    def eval(self):
        return self

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def __repr__(self):
        c = self.cfg
        return (f"EncDecModel({c.encoder.family}2{c.decoder.family}, enc {c.encoder.num_layers}x{c.encoder.hidden_size}, "
                f"dec {c.decoder.num_layers}x{c.decoder.hidden_size}, vocab {c.decoder.vocab_size}, "
                f"{self.dtype}, {self.device}, backend={self.backend})")

    # -- input checks --------------------------------------------------------------------------------
    def check_ids(self, ids, name: str, half) -> torch.Tensor:
        if ids is None:
            raise InvalidInputError(f"{name} is required.")
        if not isinstance(ids, torch.Tensor):
            try:
                ids = torch.as_tensor(ids)
            except (ValueError, TypeError) as e:
                raise InvalidInputError(f"{name} must be a 2-D tensor (or nested list) of token ids: {e}") from None
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise InvalidInputError(f"{name} must hold integer token ids, got dtype {ids.dtype}; pass a torch.long tensor.")
        if ids.dim() != 2:
            raise InvalidInputError(f"{name} must be 2-D (batch, length), got shape {tuple(ids.shape)}; "
                                    "for one sequence use ids.unsqueeze(0).")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise InvalidInputError(f"{name} is empty (shape {tuple(ids.shape)}); pass at least one sequence of at least one token.")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= half.vocab_size:
            bad = lo if lo < 0 else hi
            raise InvalidInputError(f"{name} holds token id {bad}, outside the vocabulary [0, {half.vocab_size}); "
                                    "check the tokenizer matches this checkpoint.")
        if ids.shape[1] > half.max_length:
            raise InvalidInputError(f"{name} has length {ids.shape[1]} but the model has positions for at most "
                                    f"{half.max_length} tokens; truncate the input to {half.max_length} tokens.")
        return ids.to(device=self.device, dtype=torch.long)

    def check_mask(self, mask, ids, name: str):
        """-> bool (B, L) on the device, or None when every position is kept."""
        if mask is None:
            return None
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) != tuple(ids.shape):
            raise InvalidInputError(f"{name} has shape {tuple(mask.shape)} but the ids have {tuple(ids.shape)}; they must match.")
        mask = mask.to(self.device) != 0
        if not bool(mask.any(dim=1).all()):
            raise InvalidInputError(f"{name} masks every token of some sequence; each sequence needs at least one real token.")
        return None if bool(mask.all()) else mask

    # -- the net -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_packed(self, input_ids, attention_mask=None):
        """The encoder on packed tokens: the padding is dropped before the embeddings, every encoder op
        runs on the T real tokens. -> (hidden (T, E_enc), Packing), Packing (packing.py) giving
        cu_seqlens int32 (B + 1,) (row b = hidden[cu[b]:cu[b+1]]), lengths, max_seqlen and the way
        back to the padded layout (unpack)."""
        ids = self.check_ids(input_ids, "input_ids", self.cfg.encoder)
        mask = self.check_mask(attention_mask, ids, "attention_mask")
        packing = Packing.from_mask(mask, ids.shape[0], ids.shape[1], self.device)
        enc = self.net.encoder
        pos = enc.embed.positions(ids, 0)  # (B, S), on the padded batch as transformers computes them
        return enc(packing.pack(ids), packing.pack(pos), packing, self.ops), packing

    @torch.inference_mode()
    def encode(self, input_ids, attention_mask=None):
        """-> (encoder last hidden state (B, S, E_enc), key mask bool (B, S) or None). Computed packed
        (encode_packed); padding positions hold zeros."""
        hidden, packing = self.encode_packed(input_ids, attention_mask)
        return packing.unpack(hidden), packing.mask

    @torch.inference_mode()
    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                labels=None, encoder_outputs=None, **kwargs):
        from transformers.modeling_outputs import Seq2SeqLMOutput

        unsupported = sorted(k for k, v in kwargs.items() if k not in _FORWARD_IGNORED and v is not None)
        if unsupported or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            names = unsupported or ["output_attentions/output_hidden_states"]
            raise UnsupportedArgumentError(f"forward() does not support {names}; encdec_fast takes input_ids, attention_mask, "
                                           "decoder_input_ids, decoder_attention_mask, labels and encoder_outputs.")
        ops, g = self.ops, self.net
        if encoder_outputs is not None:
            enc = encoder_outputs[0] if isinstance(encoder_outputs, (tuple, list)) else getattr(
                encoder_outputs, "last_hidden_state", encoder_outputs)
            enc = enc.to(device=self.device, dtype=self.dtype)
            enc_mask = None
            if attention_mask is not None:
                enc_mask = self.check_mask(attention_mask, enc[..., 0], "attention_mask")
        else:
            enc, enc_mask = self.encode(input_ids, attention_mask)
        if labels is not None:
            labels = torch.as_tensor(labels).to(self.device)
            if decoder_input_ids is None:
                decoder_input_ids = self.shift_right(labels)
                if decoder_attention_mask is None:
                    decoder_attention_mask = decoder_input_ids != self.config.pad_token_id
        dec_ids = self.check_ids(decoder_input_ids, "decoder_input_ids", self.cfg.decoder)
        if dec_ids.shape[0] != enc.shape[0]:
            raise InvalidInputError(f"decoder_input_ids has batch {dec_ids.shape[0]} but the encoder input has {enc.shape[0]}.")
        dec_mask = self.check_mask(decoder_attention_mask, dec_ids, "decoder_attention_mask")
        cross = g.decoder.cross_kv(g.project(enc, ops), ops)
        logits = g.decoder.full(dec_ids, dec_mask, cross, enc_mask, ops)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=enc)

    def shift_right(self, labels):
        pad, start = self.config.pad_token_id, self.config.decoder_start_token_id
        if start is None or pad is None:
            raise InvalidInputError("labels need config.decoder_start_token_id and config.pad_token_id to build "
                                    "decoder_input_ids; set them on model.config or pass decoder_input_ids.")
        shifted = labels.new_zeros(labels.shape)
        shifted[:, 1:] = labels[:, :-1]
        shifted[:, 0] = start
        return shifted.masked_fill(shifted == -100, pad)

    # -- generation ------------------------------------------------------------------------------
    def generate(self, input_ids=None, generation_config=None, **kwargs):
        """transformers' generate(): same arguments (attention_mask as a keyword), same tokens."""
        from .decode.search import generate

        if "inputs" in kwargs and input_ids is None:
            input_ids = kwargs.pop("inputs")
        attention_mask = kwargs.pop("attention_mask", None)
        return generate(self, input_ids, attention_mask, generation_config, **kwargs)


# ------------------------------------------------------------------------------------------------
def load(path=None, *, encoder=None, decoder=None, device=None, dtype=None, backend=None, seed: int = 0) -> EncDecModel:
    """Load an EncoderDecoderModel folder, or glue an encoder and a decoder checkpoint.

    device: default cuda when available, else cpu. dtype: default float32 on CPU, the stored dtype on
    CUDA. backend: "triton" (default on CUDA) or "torch" (default on CPU). seed: initialises the weights
    a glued decoder checkpoint lacks (its cross-attention), reproducibly."""
    if path is not None and (encoder is not None or decoder is not None):
        raise UnsupportedArgumentError("pass either path or encoder=/decoder=, not both.")
    dev = _pick_device(device)
    be = _pick_backend(backend, dev)
    glued = path is None and (encoder is not None or decoder is not None)
    src = ckpt.open_pair(encoder, decoder) if glued else ckpt.open_folder(path)
    dt = _pick_dtype(dtype, src.stored_dtype, dev)
    net = ckpt.build_net(src, device=dev, dtype=dt, seed=seed)
    return EncDecModel(net, src.hf_config, ckpt.generation_config(src), be, path=src.folder)
