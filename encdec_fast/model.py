"""load() and the drop-in model object it returns."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from . import ops as ops_mod
from . import prepack as prepack_mod
from . import quantize as quantize_mod
from . import validate
from .checkpoint import hub
from .checkpoint import weight_map as wm
from .config import ModelConfig
from .cpu import weights as lowp
from .errors import InvalidInputError, UnsupportedArgumentError
from .modules import EncoderDecoderNet
from .packing import Packing
from .views import DecoderView, EncoderView, check_model_kwargs, transition_scores, wants_dict

_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_INFERENCE_ONLY = ("encdec_fast is inference only: fine-tune with transformers and load the result "
                   "(encdec_fast.load(folder) after save_pretrained(), or encdec_fast.from_transformers(model) "
                   "in memory)")


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
    if isinstance(dtype, str) and dtype == "auto":  # transformers' "auto": the dtype the weights are stored in
        dtype = stored
    if isinstance(dtype, str):
        dtype = _NAMES.get(dtype, dtype)
    if not isinstance(dtype, torch.dtype):
        raise InvalidInputError(f"dtype={dtype!r} is not a torch dtype; use torch.float32, torch.float16 or "
                                f"torch.bfloat16 (or one of the names {sorted(_NAMES)}, or \"auto\").")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UnsupportedArgumentError(f"dtype={dtype!r} is not supported; use torch.float32, torch.float16 or torch.bfloat16.")
    return dtype


def _op_table(net, backend: str):
    """The op table that reads the net's projection weights as they are stored (quantize.py)."""
    return quantize_mod.table(net, backend)


_EMBEDDINGS = (".embed.word", ".embed.position", ".embed.token_type")  # transformers' nn.Embedding weights


def _move_buffers(net: nn.Module, device, dtype) -> None:
    """Every buffer of net to device (the floating ones to dtype too), one new tensor per old one: a tensor
    that several modules share (tied weights) stays one tensor, where nn.Module.to would copy each use."""
    moved: dict[int, tuple] = {}
    for m in net.modules():
        for name, t in m._buffers.items():
            if t is None:
                continue
            if id(t) not in moved:
                cast = dtype if dtype is not None and t.is_floating_point() else None
                moved[id(t)] = (t, t.to(device=device, dtype=cast))
            m._buffers[name] = moved[id(t)][1]


class EncDecModel(nn.Module):
    """Drop-in for transformers' EncoderDecoderModel at inference: forward(), generate(), config, and the
    torch surface scripts touch (to/half/float/bfloat16/cpu/cuda, eval, parameters, num_parameters).

    An nn.Module whose weights are the buffers of self.net, in this runtime's layout (fused projections;
    oneDNN-packed on the CPU, prepack.py). parameters() yields those weights, each logical parameter once
    whatever its storage; every move or cast goes through to(), which unpacks, moves, repacks and picks the
    op table. The nn.Module methods that would act on the storage tensor by tensor (state_dict,
    load_state_dict, the _apply family: type(), share_memory(), to_empty()...) or train the model (train(),
    requires_grad_(True)) raise UnsupportedArgumentError saying what to do instead."""

    main_input_name = "input_ids"

    def __init__(self, net: EncoderDecoderNet, hf_config, generation_config, backend: str, path=None,
                 prepack: bool = True, quantize: str | None = None):
        super().__init__()
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
        # decode as a CUDA graph would, without capturing: bucketed states reused across generate() calls, eager
        # steps over their whole buffers (how the CPU tests exercise the CUDA path's shapes)
        self.graph_shapes = False
        self._state_cache = None
        self._weight_sizes = None  # [(buffer name, logical numel)] of the checkpoint's weights (_weights)
        self.train(False)

    @property
    def state_cache(self):
        """Decode states (with their captured steps on CUDA) reused across generate() calls of nearby shapes."""
        if self._state_cache is None:
            from .decode.runner import StateCache

            self._state_cache = StateCache()
        return self._state_cache

    # -- torch-like ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.net.encoder.embed.word.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.encoder.embed.word.dtype

    def to(self, *args, backend=None, **kwargs):
        """to(device), to(dtype), to(device, dtype), to(tensor), to(device=..., dtype=...), as torch parses
        them (non_blocking and memory_format are accepted and change nothing); dtype also by name ("fp16",
        "bfloat16", ...). backend= picks the backend (default: the new device type's). The projection weights
        are unpacked, moved and packed again where packing applies; the op table follows. Returns the model."""
        if isinstance(kwargs.get("dtype"), str):
            kwargs["dtype"] = _pick_dtype(kwargs["dtype"], self.dtype, self.device)
        try:
            device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        except (TypeError, RuntimeError, ValueError) as e:
            msg = " ".join(str(e).split())
            raise InvalidInputError(f"model.to() cannot read its arguments ({msg}); pass a device ('cpu', 'cuda', "
                                    "'cuda:1'), a dtype (torch.float16, torch.bfloat16, torch.float32), both, or a "
                                    "tensor whose device and dtype to take.") from None
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
        _move_buffers(self.net, dev, dtype)
        self._state_cache = None  # its states and captured steps point at the old tensors
        self.backend = new_backend
        transform = quantize_mod.transform(self.device, self.dtype, self.backend, self.prepack, None)
        if transform is not None:
            transform.net(self.net)
        self.ops = _op_table(self.net, self.backend)
        return self

    def half(self):
        return self.to(dtype=torch.float16)

    def float(self):
        return self.to(dtype=torch.float32)

    def bfloat16(self):
        return self.to(dtype=torch.bfloat16)

    def double(self):
        return self.to(dtype=torch.float64)  # refused by _pick_dtype, with the dtypes that work

    def cpu(self):
        return self.to("cpu")

    def cuda(self, device=None):
        return self.to(torch.device("cuda", device) if isinstance(device, int) else (device or "cuda"))

    def _apply(self, fn, recurse=True):
        raise UnsupportedArgumentError(
            "this torch.nn.Module method converts the weights tensor by tensor, which encdec_fast's packed weights "
            "do not allow; move or cast the model with model.to(device, dtype) (or .half(), .float(), .bfloat16(), "
            ".cpu(), .cuda()).")

    def train(self, mode: bool = True):
        """train(False) is eval(); train() / train(True) refuses: encdec_fast runs inference only."""
        if mode:
            raise UnsupportedArgumentError(f"model.train() is not supported: {_INFERENCE_ONLY}.")
        for m in self.modules():
            m.training = False
        return self

    def requires_grad_(self, requires_grad: bool = True):
        if requires_grad:
            raise UnsupportedArgumentError(f"requires_grad_(True): the weights cannot be trained; {_INFERENCE_ONLY}.")
        return self  # they never require grad

    def state_dict(self, *args, **kwargs):
        raise UnsupportedArgumentError(
            "state_dict(): encdec_fast holds the weights in its own layout (fused projections, oneDNN-packed on the "
            "CPU), which neither transformers nor this runtime reads back; keep the checkpoint folder (or the "
            "transformers model) as the saved form, and read the weights with model.named_parameters().")

    def load_state_dict(self, *args, **kwargs):
        raise UnsupportedArgumentError("load_state_dict(): load new weights with encdec_fast.load(folder) or "
                                       "encdec_fast.from_transformers(model), which build the model from them.")

    # -- parameters: the weights read from the checkpoint, counted by their logical shape -----------
    def _weights(self, remove_duplicate: bool = True):
        """(buffer name, stored tensor, logical numel) of every weight read from the checkpoint, in the
        name table's order. With remove_duplicate each parameter once, as transformers counts them: tensors
        shared between modules (tie_encoder_decoder) once, and an LM head tied to the word embeddings not at
        all (on the CPU it is a packed copy of them, prepack.py). The numel comes from the shapes the config
        implies, so that a storage transform (packing, quantisation) cannot change the count."""
        if self._weight_sizes is None:
            with torch.device("meta"):
                shapes = {n: b.shape for n, b in EncoderDecoderNet(self.cfg).named_buffers(remove_duplicate=False)}
            self._weight_sizes = [(n, math.prod(shapes[n])) for n in wm.full_plan(self.cfg, set())]
        tied_head = self.cfg.decoder.tie_word_embeddings
        seen = set()
        for name, numel in self._weight_sizes:
            module, _, leaf = name.rpartition(".")
            t = self.net.get_submodule(module)._buffers[leaf]
            if remove_duplicate:
                if id(t) in seen or (tied_head and name == "decoder.head.weight"):
                    continue
                seen.add(id(t))
            yield name, t, numel

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """(name, tensor) of every weight read from the checkpoint, in this runtime's names and layout
        (net.encoder.layers.0.attn.qkv.weight holds BERT's query, key and value); tied weights once unless
        remove_duplicate=False. They are buffers that never require grad. On the CPU the projection weights
        are oneDNN-packed (is_mkldnn): shape, dtype, device and numel() are the logical ones, and
        .to_dense() gives the plain matrix."""
        if not recurse:
            return
        pre = f"{prefix}." if prefix else ""
        for name, t, _ in self._weights(remove_duplicate):
            yield f"{pre}net.{name}", t

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """transformers' EncoderDecoderModel.num_parameters() for the same checkpoint: tied weights once,
        exclude_embeddings leaving out the word, position and token type embeddings; only_trainable counts
        the weights that require grad (none: encdec_fast is inference only). It includes the encoder's pooler
        (BERT, RoBERTa: hidden x hidden + hidden), which transformers builds and never uses in a
        sequence-to-sequence model, and which encdec_fast does not load: sum(p.numel() for p in
        model.parameters()) is the count without it."""
        total = 0
        for name, t, numel in self._weights():
            if exclude_embeddings and name.endswith(_EMBEDDINGS):
                continue
            if t.requires_grad or not only_trainable:
                total += numel
        enc = self.cfg.encoder
        if not only_trainable and enc.family in ("bert", "roberta"):  # BertModel / RobertaModel's pooler
            total += enc.hidden_size * (enc.hidden_size + 1)
        return total

    # -- the transformers surface ----------------------------------------------------------------
    @classmethod
    def can_generate(cls) -> bool:
        return True

    def get_encoder(self) -> EncoderView:
        """The encoder for calling: get_encoder()(input_ids, attention_mask) -> BaseModelOutput, whose output
        model(encoder_outputs=..., attention_mask=...) takes (views.py)."""
        return EncoderView(self)

    def get_decoder(self) -> DecoderView:
        """The decoder with its LM head for calling, as transformers' *ForCausalLM decoder (views.py)."""
        return DecoderView(self)

    @property
    def encoder(self) -> EncoderView:
        return EncoderView(self)

    @property
    def decoder(self) -> DecoderView:
        return DecoderView(self)

    def compute_transition_scores(self, sequences, scores, beam_indices=None, normalize_logits: bool = False):
        """transformers' GenerationMixin.compute_transition_scores on generate()'s outputs (sequences, scores
        and, after beam search, beam_indices): the score of each chosen token, (rows, generated length)."""
        return transition_scores(self, sequences, scores, beam_indices, normalize_logits)

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return self.shift_right(labels)

    def __repr__(self):
        c = self.cfg
        return (f"EncDecModel({c.encoder.family}2{c.decoder.family}, enc {c.encoder.num_layers}x{c.encoder.hidden_size}, "
                f"dec {c.decoder.num_layers}x{c.decoder.hidden_size}, vocab {c.decoder.vocab_size}, "
                f"{self.dtype}, {self.device}, backend={self.backend})")

    # -- the net: under no_grad, not inference_mode, so that the tensors returned are ordinary ones (editable
    # in place, usable in later autograd); the weights are buffers, so no graph is recorded either way --------
    @torch.no_grad()
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

    @torch.no_grad()
    def encode(self, input_ids, attention_mask=None, token_type_ids=None):
        """-> (encoder last hidden state (B, S, E_enc), key mask bool (B, S) or None). Computed packed
        (encode_packed); padding positions hold zeros."""
        hidden, packing = self.encode_packed(input_ids, attention_mask, token_type_ids)
        return packing.unpack(hidden), packing.mask

    @torch.no_grad()
    def decoder_logits(self, decoder_input_ids, decoder_mask, enc, enc_mask):
        """The decoder over whole sequences: ids long (B, L), decoder_mask bool (B, L) or None, enc the
        encoder output in the decoder's width (after enc_to_dec_proj) (B, S, E_dec), enc_mask bool (B, S)
        or None -> logits (B, L, V)."""
        ops, dec = self.ops, self.net.decoder
        return dec.full(decoder_input_ids, decoder_mask, dec.cross_kv(enc, ops), enc_mask, ops)

    @torch.no_grad()
    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, cache=None, inputs_embeds=None, decoder_inputs_embeds=None, labels=None,
                use_cache=None, *, token_type_ids=None, return_dict=None, **kwargs):
        """transformers' EncoderDecoderModel.forward (same arguments in the same order) -> Seq2SeqLMOutput(loss
        with labels, logits, encoder_last_hidden_state), or its to_tuple() with return_dict=False (as
        transformers' with use_cache=False: no cache is kept). cache / past_key_values, inputs_embeds,
        decoder_inputs_embeds, output_attentions and output_hidden_states are refused unless None (False)."""
        from transformers.modeling_outputs import Seq2SeqLMOutput

        check_model_kwargs("forward()", dict(kwargs, cache=cache, inputs_embeds=inputs_embeds,
                                             decoder_inputs_embeds=decoder_inputs_embeds),
                           "input_ids, attention_mask, token_type_ids, decoder_input_ids, decoder_attention_mask, "
                           "labels, encoder_outputs, use_cache and return_dict")
        ops, net, dev = self.ops, self.net, self.device
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
        logits = self.decoder_logits(dec_ids, dec_mask, net.project(enc, ops), enc_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=validate.IGNORE_INDEX)
        # fp32 where the CPU's bf16 / int8 kernels compute them so (the logits selection reads), else the dtype's
        out = Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=enc)
        return out if wants_dict(self, return_dict) else out.to_tuple()

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
         check_finite: bool = True, prepack: bool = True, quantize: str | None = None,
         revision: str | None = None, token=None, cache_dir=None, local_files_only: bool | None = None,
         torch_dtype=None, **kwargs) -> EncDecModel:
    """Load an EncoderDecoderModel folder or Hub id, or glue an encoder and a decoder checkpoint.

    path / encoder / decoder: a local folder (any path that exists, any os.PathLike), or a Hugging Face Hub
    id ("org/name") resolved through huggingface_hub (checkpoint/hub.py): the local cache first, downloads
    of only the files a load reads when online, the cache alone when offline (HF_HUB_OFFLINE=1 or
    local_files_only=True). revision (branch, tag or commit hash), token and cache_dir as for transformers'
    from_pretrained; they apply to every Hub id given and are ignored for local folders.
    device: default cuda when available, else cpu. dtype (or torch_dtype, its transformers 4 name): default
    float32 on CPU, the stored dtype on CUDA; "auto" the stored dtype. backend: "triton" (default on CUDA) or
    "torch" (default on CPU). seed: initialises the weights a glued decoder checkpoint lacks (its
    cross-attention), reproducibly. check_finite: refuse weights holding NaN or inf (or overflowing dtype)
    with an error naming the tensor; False skips the check.
    prepack: on the CPU (torch backend), pack the projection weights once at load for the CPU kernels
    (cpu/weights.py: fp32, and bf16 with fp32 activations; 1.4-2x faster projections at decode sizes than
    oneDNN's) or, where those cannot run, for oneDNN (prepack.py), at the cost of a second copy of an LM
    head tied to the word embeddings; False keeps plain
    tensors. Ignored elsewhere. quantize: None, or "int8": every projection weight and the LM head stored
    int8 with fp16 scales per output channel and group of 32 inputs, quantised as each weight is read
    (quantize.py). On the CPU they are multiplied with fp32 activations (cpu/weights.py) and dtype (bfloat16 by default, or float32) is
    what the rest is stored in (the embeddings, the K/V cache); on CUDA the Triton fused linear reads them
    (w8a16) in the activations' dtype. Such a model cannot be moved to another device or dtype."""
    if kwargs:
        raise UnsupportedArgumentError(
            f"load() does not take {sorted(kwargs)}; it takes path (or encoder= and decoder=), device, dtype (or "
            "torch_dtype), backend, seed, check_finite, prepack, quantize, revision, token, cache_dir and "
            "local_files_only.")
    for name, value in (("path", path), ("encoder", encoder), ("decoder", decoder)):
        validate.path(value, name)
    validate.number(seed, "seed", validate.SEED)
    validate.number(check_finite, "check_finite", validate.Field("bool"))
    validate.number(prepack, "prepack", validate.Field("bool"))
    hub.check_options(revision, token, cache_dir, local_files_only)
    dtype = _dtype_argument(dtype, torch_dtype)
    if path is not None and (encoder is not None or decoder is not None):
        raise InvalidInputError("pass either path (an EncoderDecoderModel folder or Hub id) or encoder= and decoder= "
                                "(two checkpoints to glue), not both.")
    _pick_backend(backend, _pick_device(device))  # argument errors before any file is read
    _check_quantize_early(quantize, device, dtype, backend, prepack)
    glued = path is None and (encoder is not None or decoder is not None)
    where = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    if glued:
        if encoder is None or decoder is None:  # before either is looked up
            raise InvalidInputError("gluing needs both encoder= and decoder= checkpoints (folders or Hub ids).")
        src = ckpt.open_pair(hub.resolve(encoder, **where), hub.resolve(decoder, **where))
    else:
        src = ckpt.open_folder(hub.resolve(path, **where))
    return _build(src, device, dtype, backend, seed, check_finite, prepack, quantize)


def _dtype_argument(dtype, torch_dtype):
    """load()'s dtype from dtype= or torch_dtype= (transformers accepts both names); both given must agree."""
    if torch_dtype is None:
        return dtype
    if dtype is None:
        return torch_dtype
    same = _NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if same != (_NAMES.get(torch_dtype, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype):
        raise InvalidInputError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one of them (dtype is "
                                "the current name, torch_dtype the older one).")
    return dtype


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
