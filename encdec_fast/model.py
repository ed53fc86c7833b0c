"""load() and the drop-in model object it returns."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import ops as ops_mod
from . import prepack as prepack_mod
from . import quantize as quantize_mod
from . import validate
from .cpu import weights as lowp
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
    except (RuntimeError, TypeError, ValueError) as e:
        raise InvalidInputError(f"device={device!r} is not a torch device ({e}); use 'cpu' or 'cuda'.") from None
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
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if isinstance(dtype, str):
        dtype = names.get(dtype, dtype)
    if not isinstance(dtype, torch.dtype):
        raise InvalidInputError(f"dtype={dtype!r} is not a torch dtype; use torch.float32, torch.float16 or "
                                f"torch.bfloat16 (or one of the names {sorted(names)}).")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UnsupportedArgumentError(f"dtype={dtype!r} is not supported; use torch.float32, torch.float16 or torch.bfloat16.")
    return dtype


def _op_table(net, backend: str):
    """The op table that reads the net's projection weights as they are stored (quantize.py)."""
    return quantize_mod.table(net, backend)


class EncDecModel:
    """Drop-in for transformers' EncoderDecoderModel at inference: forward(), generate(), config."""

    def __init__(self, net: EncoderDecoderNet, hf_config, generation_config, backend: str, path=None,
                 prepack: bool = True, quantize: str | None = None):
        self.net = net
        self.prepack = prepack  # oneDNN-packed projection weights wherever they apply (prepack.py)
        self.quantize = quantize  # "int8": int8 projection weights (quantize.py), or None
        self.cfg: ModelConfig = net.cfg
        self.config = hf_config
        self.generation_config = generation_config
        self.backend = backend
        self.ops = _op_table(net, backend)
        self.path = path
        self.cuda_graphs = True  # capture the decode step as a CUDA graph on CUDA devices
        self.static_decode = False  # the bucketed static-buffer step without capture (tests it on the CPU)
        self._graph_cache = None

    @property
    def graph_cache(self):
        """Captured decode steps (CUDA only), reused across generate() calls of the same shapes."""
        if self._graph_cache is None:
            from .decode.state import StateCache

            self._graph_cache = StateCache()
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
        if self.quantize is not None:
            if (dev, dtype or self.dtype, new_backend) == (self.device, self.dtype, self.backend):
                return self
            raise UnsupportedArgumentError(
                f"this model was loaded with quantize={self.quantize!r}: its weights are int8 and the floating-point "
                f"ones are gone, so it cannot move to {dev} / {dtype or self.dtype} / backend {new_backend!r}. Load the "
                "checkpoint again with the device and dtype you want.")
        if lowp.is_packed(self.net):  # packed tensors only move as plain ones
            lowp.unpack_net(self.net, self.dtype)
        prepack_mod.unpack(self.net)
        self.net.to(device=dev, dtype=dtype)
        self._graph_cache = None  # captured graphs point at the old tensors
        self.backend = new_backend
        transform = quantize_mod.transform(self.device, self.dtype, self.backend, self.prepack, None)
        if transform is not None:
            transform.net(self.net)
        self.ops = _op_table(self.net, self.backend)
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

    # -- the net -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_packed(self, input_ids, attention_mask=None, token_type_ids=None):
        """The encoder on packed tokens: the padding is dropped before the embeddings, every encoder op
        runs on the T real tokens. -> (hidden (T, E_enc), Packing), Packing (packing.py) giving
        cu_seqlens int32 (B + 1,) (row b = hidden[cu[b]:cu[b+1]]), lengths, max_seqlen and the way
        back to the padded layout (unpack)."""
        ids = validate.token_ids(input_ids, "input_ids", self.cfg.encoder).to(self.device)
        mask = validate.attention_mask(attention_mask, ids.shape, "attention_mask")
        mask = mask.to(self.device) if mask is not None else None
        types = validate.token_type_ids(token_type_ids, ids.shape, self.cfg.encoder)
        packing = Packing.from_mask(mask, ids.shape[0], ids.shape[1], self.device)
        enc = self.net.encoder
        pos = enc.embed.positions(ids, 0)  # (B, S), on the padded batch as transformers computes them
        types = packing.pack(types.to(self.device)) if types is not None else None
        return enc(packing.pack(ids), packing.pack(pos), packing, self.ops, types), packing

    @torch.inference_mode()
    def encode(self, input_ids, attention_mask=None, token_type_ids=None):
        """-> (encoder last hidden state (B, S, E_enc), key mask bool (B, S) or None). Computed packed
        (encode_packed); padding positions hold zeros."""
        hidden, packing = self.encode_packed(input_ids, attention_mask, token_type_ids)
        return packing.unpack(hidden), packing.mask

    @torch.inference_mode()
    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                labels=None, encoder_outputs=None, token_type_ids=None, **kwargs):
        from transformers.modeling_outputs import Seq2SeqLMOutput

        unsupported = sorted(k for k, v in kwargs.items() if k not in _FORWARD_IGNORED and v is not None)
        if unsupported or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            names = unsupported or ["output_attentions/output_hidden_states"]
            raise UnsupportedArgumentError(f"forward() does not support {names}; encdec_fast takes input_ids, attention_mask, "
                                           "token_type_ids, decoder_input_ids, decoder_attention_mask, labels and "
                                           "encoder_outputs.")
        ops, g, dev = self.ops, self.net, self.device
        if encoder_outputs is not None:
            enc = validate.encoder_outputs(encoder_outputs, self.cfg.encoder.hidden_size).to(device=dev, dtype=self.dtype)
            enc_mask = validate.attention_mask(attention_mask, enc.shape[:2], "attention_mask")
            enc_mask = enc_mask.to(dev) if enc_mask is not None else None
        else:
            enc, enc_mask = self.encode(input_ids, attention_mask, token_type_ids)
        B = enc.shape[0]
        if labels is not None:
            labels = validate.labels(labels, self.cfg.decoder, B).to(dev)
            if decoder_input_ids is None:
                decoder_input_ids = self.shift_right(labels)
                if decoder_attention_mask is None:
                    decoder_attention_mask = decoder_input_ids != self.config.pad_token_id
        dec_ids = validate.token_ids(decoder_input_ids, "decoder_input_ids", self.cfg.decoder).to(dev)
        if dec_ids.shape[0] != B:
            raise InvalidInputError(f"decoder_input_ids has batch {dec_ids.shape[0]} but the encoder input has {B}.")
        if labels is not None and labels.shape != dec_ids.shape:
            raise InvalidInputError(f"labels have shape {tuple(labels.shape)} but decoder_input_ids {tuple(dec_ids.shape)}; "
                                    "they must match (or leave decoder_input_ids out: it is built from the labels).")
        dec_mask = validate.attention_mask(decoder_attention_mask, dec_ids.shape, "decoder_attention_mask")
        dec_mask = dec_mask.to(dev) if dec_mask is not None else None
        cross = g.decoder.cross_kv(g.project(enc, ops), ops)
        logits = g.decoder.full(dec_ids, dec_mask, cross, enc_mask, ops)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=validate.IGNORE_INDEX)
        return Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=enc)

    def shift_right(self, labels):
        pad, start = self.config.pad_token_id, self.config.decoder_start_token_id
        if start is None or pad is None:
            raise InvalidInputError("labels need config.decoder_start_token_id and config.pad_token_id to build "
                                    "decoder_input_ids; set them on model.config or pass decoder_input_ids.")
        V, fix = self.cfg.decoder.vocab_size, "set a valid one on model.config or pass decoder_input_ids"
        start = validate.special_id(start, "config.decoder_start_token_id", V, fix)
        pad = validate.special_id(pad, "config.pad_token_id", V, fix)
        shifted = labels.new_zeros(labels.shape)
        shifted[:, 1:] = labels[:, :-1]
        shifted[:, 0] = start
        return shifted.masked_fill(shifted == validate.IGNORE_INDEX, pad)

    # -- generation ------------------------------------------------------------------------------
    def generate(self, input_ids=None, generation_config=None, **kwargs):
        """transformers' generate(): same arguments (attention_mask as a keyword), same tokens."""
        from .decode.search import generate

        if "inputs" in kwargs and input_ids is None:
            input_ids = kwargs.pop("inputs")
        attention_mask = kwargs.pop("attention_mask", None)
        return generate(self, input_ids, attention_mask, generation_config, **kwargs)


# ------------------------------------------------------------------------------------------------
def _build(src, device, dtype, backend, seed: int, check_finite: bool, prepack: bool, quantize=None) -> EncDecModel:
    """The model for a resolved checkpoint source (checkpoint/sources.py): what load() and from_transformers() share."""
    dev = _pick_device(device)
    be = _pick_backend(backend, dev)
    dt = _pick_dtype(dtype, src.stored_dtype, dev)
    if dtype is None and quantize_mod.default_dtype(quantize, dev, be) is not None:  # int8 on the CPU: the rest in bf16
        dt = quantize_mod.default_dtype(quantize, dev, be)
    quantize_mod.check(quantize, dev, dt, be, prepack)
    transform = quantize_mod.transform(dev, dt, be, prepack, quantize)
    net = ckpt.build_net(src, device=dev, dtype=dt, seed=seed, check_finite=check_finite, transform=transform)
    return EncDecModel(net, src.hf_config, ckpt.generation_config(src), be, path=src.folder, prepack=prepack,
                       quantize=quantize)


def _check_quantize_early(quantize, device, dtype, backend, prepack):
    """quantize='...' errors that need no checkpoint, before any file is read (the dtype default is known
    only once the checkpoint is: checked again in _build)."""
    dev = _pick_device(device)
    be = _pick_backend(backend, dev)
    quantize_mod.check(quantize, dev, _pick_dtype(dtype, torch.float32, dev), be, prepack)


def load(path=None, *, encoder=None, decoder=None, device=None, dtype=None, backend=None, seed: int = 0,
         check_finite: bool = True, prepack: bool = True, quantize: str | None = None) -> EncDecModel:
    """Load an EncoderDecoderModel folder, or glue an encoder and a decoder checkpoint.

    device: default cuda when available, else cpu. dtype: default float32 on CPU, the stored dtype on
    CUDA. backend: "triton" (default on CUDA) or "torch" (default on CPU). seed: initialises the weights
    a glued decoder checkpoint lacks (its cross-attention), reproducibly. check_finite: refuse weights
    holding NaN or inf (or overflowing dtype) with an error naming the tensor; False skips the check.
    prepack: on the CPU (torch backend), pack the projection weights once at load for the CPU kernels
    (cpu/weights.py: fp32, and bf16 with fp32 activations; 1.4-2x faster projections at decode sizes than
    oneDNN's) or, where those cannot run, for oneDNN (prepack.py), at the cost of a second copy of an LM
    head tied to the word embeddings; False keeps plain
    tensors. Ignored elsewhere. quantize: None, or "int8": every projection weight and the LM head stored
    int8 with per-output-channel scales, quantised as each weight is read (quantize.py). On the CPU they
    are multiplied with fp32 activations (cpu/weights.py) and dtype (bfloat16 by default, or float32) is
    what the rest is stored in (the embeddings, the K/V cache); on CUDA the Triton fused linear reads them
    (w8a16) in the activations' dtype. Such a model cannot be moved to another device or dtype."""
    for name, value in (("path", path), ("encoder", encoder), ("decoder", decoder)):
        validate.path(value, name)
    validate.number(seed, "seed", validate.SEED)
    validate.number(check_finite, "check_finite", validate.Field("bool"))
    validate.number(prepack, "prepack", validate.Field("bool"))
    if path is not None and (encoder is not None or decoder is not None):
        raise InvalidInputError("pass either path (an EncoderDecoderModel folder) or encoder= and decoder= (two "
                                "checkpoints to glue), not both.")
    _pick_backend(backend, _pick_device(device))  # argument errors before any file is read
    _check_quantize_early(quantize, device, dtype, backend, prepack)
    glued = path is None and (encoder is not None or decoder is not None)
    src = ckpt.open_pair(encoder, decoder) if glued else ckpt.open_folder(path)
    return _build(src, device, dtype, backend, seed, check_finite, prepack, quantize)


def from_transformers(hf_model, *, device=None, dtype=None, backend=None, check_finite: bool = True,
                      prepack: bool = True, quantize: str | None = None) -> EncDecModel:
    """The encdec_fast model of a transformers EncoderDecoderModel in memory (for example right after
    fine-tuning): the same model load() gives for its save_pretrained() folder, without the round trip.
    Every tensor, the config and the generation config are copied: nothing is shared with hf_model.
    device, dtype, backend, check_finite, prepack and quantize as for load()."""
    validate.number(prepack, "prepack", validate.Field("bool"))
    _pick_backend(backend, _pick_device(device))
    _check_quantize_early(quantize, device, dtype, backend, prepack)
    return _build(ckpt.open_module(hf_model), device, dtype, backend, 0, check_finite, prepack, quantize)
