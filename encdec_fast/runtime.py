"""load() and the drop-in model object it returns."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import ops as ops_mod
from .config import ModelConfig, from_hf
from .errors import CheckpointError, InvalidInputError, UnsupportedArgumentError, UnsupportedModelError
from .model import EncoderDecoderGraph

_FORWARD_IGNORED = {"use_cache", "return_dict", "output_attentions", "output_hidden_states"}


def _read_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise UnsupportedModelError(
            f"cannot read {str(path / 'config.json')!r} as a transformers config: {e}. "
            "encdec_fast reads EncoderDecoderModel folders (BERT/RoBERTa encoder, GPT-2/BERT/RoBERTa decoder)."
        ) from None


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


def _init_missing(model, plan, missing: set[str], seed: int, std: float, dtype, device) -> list[str]:
    """Reproducibly initialise every buffer whose HF tensors are missing; returns the HF names."""
    g = torch.Generator().manual_seed(seed)
    done = []
    for ours, (hf_names, _) in plan.items():
        if not any(h in missing for h in hf_names):
            continue
        mod_name, _, leaf = ours.rpartition(".")
        mod = model.get_submodule(mod_name)
        shape = mod._buffers[leaf].shape
        if leaf == "bias":
            t = torch.zeros(shape)
        elif mod.__class__.__name__ == "LayerNorm":
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=g) * std
        mod._buffers[leaf] = t.to(device=device, dtype=dtype)
        done += [h for h in hf_names if h in missing]
    return done


def _alias(keys: set[str], strip: tuple[str, ...], canon: str, extra: dict[str, str]) -> dict[str, str]:
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


class EncDecModel:
    """Drop-in for transformers' EncoderDecoderModel at inference: forward(), generate(), config."""

    def __init__(self, graph: EncoderDecoderGraph, hf_config, generation_config, backend: str, path=None):
        self.graph = graph
        self.cfg: ModelConfig = graph.cfg
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
            from .graphs import GraphCache

            self._graph_cache = GraphCache()
        return self._graph_cache

    # -- torch-like ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.graph.encoder.embed.word.device

    @property
    def dtype(self) -> torch.dtype:
        return self.graph.encoder.embed.word.dtype

    def to(self, device=None, dtype=None, *, backend=None):
        dev = _pick_device(device) if device is not None else self.device
        if dtype is not None:
            dtype = _pick_dtype(dtype, self.dtype, dev)
        # a new device type gets its default backend unless one is named
        new_backend = _pick_backend(backend, dev) if (backend or dev.type != self.device.type) else self.backend
        self.graph.to(device=dev, dtype=dtype)
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

    # -- the graph ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, input_ids, attention_mask=None):
        """-> (encoder last hidden state (B, S, E_enc), key mask bool (B, S) or None)"""
        ids = self.check_ids(input_ids, "input_ids", self.cfg.encoder)
        mask = self.check_mask(attention_mask, ids, "attention_mask")
        return self.graph.encoder(ids, mask, self.ops), mask

    @torch.inference_mode()
    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                labels=None, encoder_outputs=None, **kwargs):
        from transformers.modeling_outputs import Seq2SeqLMOutput

        unsupported = sorted(k for k, v in kwargs.items() if k not in _FORWARD_IGNORED and v is not None)
        if unsupported or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            names = unsupported or ["output_attentions/output_hidden_states"]
            raise UnsupportedArgumentError(f"forward() does not support {names}; encdec_fast takes input_ids, attention_mask, "
                                           "decoder_input_ids, decoder_attention_mask, labels and encoder_outputs.")
        ops, g = self.ops, self.graph
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
        from .generation import generate

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
    from transformers import EncoderDecoderConfig, GenerationConfig

    if path is not None and (encoder is not None or decoder is not None):
        raise UnsupportedArgumentError("pass either path or encoder=/decoder=, not both.")
    dev = _pick_device(device)
    be = _pick_backend(backend, dev)
    if path is not None or (encoder is None and decoder is None):
        folder = ckpt.folder(path)
        hf = _read_config(folder)
        if getattr(hf, "model_type", None) != "encoder-decoder":
            raise UnsupportedModelError(
                f"{str(folder)!r} holds a {getattr(hf, 'model_type', '?')!r} model, not an EncoderDecoderModel. "
                "Load encoder and decoder checkpoints separately with load(encoder=..., decoder=...), or use "
                "transformers for native seq2seq models (T5, BART, ...).")
        cfg = from_hf(hf)
        reader = ckpt.WeightReader(folder)
        keys = reader.keys()
        plan = ckpt.full_plan(cfg, keys)
        fetch, names = reader.get, keys
        tied = {}
        if cfg.tie_encoder_decoder:  # checkpoints saved with tied halves drop the decoder's copies
            fam = cfg.decoder.family
            for k in keys:
                if k.startswith("encoder."):
                    tied[f"decoder.{fam}." + k[len("encoder."):]] = k
            names = keys | set(tied)
            fetch = lambda n: reader.get(tied.get(n, n) if n not in keys else n)  # noqa: E731
        missing, unexpected = ckpt.missing_and_unexpected(plan, names, cfg)
        ckpt.report_missing(str(folder), missing, unexpected)
        init_missing: set[str] = set()
        gen_dir = folder
    else:
        if encoder is None or decoder is None:
            raise UnsupportedArgumentError("gluing needs both encoder= and decoder= checkpoint folders.")
        ef, df = ckpt.folder(encoder), ckpt.folder(decoder)
        ecfg, dcfg = _read_config(ef), _read_config(df)
        for c, role in ((ecfg, "encoder"), (dcfg, "decoder")):
            if getattr(c, "model_type", None) == "encoder-decoder":
                raise UnsupportedArgumentError(f"{role}= got an EncoderDecoderModel folder; pass it as load(path).")
        dcfg.is_decoder, dcfg.add_cross_attention = True, True
        hf = EncoderDecoderConfig.from_encoder_decoder_configs(ecfg, dcfg)
        cfg = from_hf(hf)
        er, dr = ckpt.WeightReader(ef), ckpt.WeightReader(df)
        fam = cfg.decoder.family
        ealias = _alias(er.keys(), ("bert.", "roberta."), "encoder.", {"cls.": "encoder.cls.", "lm_head.": "encoder.lm_head."})
        if fam == "gpt2":
            dalias = _alias(dr.keys(), ("transformer.",), "decoder.transformer.", {"lm_head.": "decoder.lm_head."})
        else:
            dalias = _alias(dr.keys(), (f"{fam}.",), f"decoder.{fam}.",
                            {"cls.": "decoder.cls.", "lm_head.": "decoder.lm_head."})
        names = set(ealias) | set(dalias)
        plan = ckpt.full_plan(cfg, names)
        missing, unexpected = ckpt.missing_and_unexpected(plan, names, cfg)
        unexpected = [u for u in unexpected if not u.startswith(("encoder.cls.", "encoder.lm_head.", "decoder.lm_head.bias"))]
        enc_missing = [m for m in missing if not m.startswith(("decoder.", "enc_to_dec_proj."))]
        ckpt.report_missing(f"encoder {str(ef)!r} / decoder {str(df)!r}", enc_missing, unexpected)
        init_missing = set(missing)

        def fetch(n):
            return er.get(ealias[n]) if n in ealias else dr.get(dalias[n])

        gen_dir = df

    stored = reader.dtype() if path is not None or (encoder is None and decoder is None) else er.dtype()
    dt = _pick_dtype(dtype, stored, dev)
    with torch.device("meta"):
        graph = EncoderDecoderGraph(cfg)
    if init_missing:
        std = getattr(hf.decoder, "initializer_range", 0.02)
        done = _init_missing(graph, plan, init_missing, seed, std, dt, dev)
        plan = {k: v for k, v in plan.items() if not any(h in init_missing for h in v[0])}
        warnings.warn(
            f"the glued checkpoints lack {len(done)} tensors that only the combined model has (decoder "
            f"cross-attention, enc_to_dec_proj); initialised from seed {seed}. Fine-tune before use, as after "
            f"from_encoder_decoder_pretrained: {sorted(done)}", stacklevel=2)
    try:
        ckpt.assign(graph, plan, fetch, device=dev, dtype=dt)
    except KeyError as e:
        raise CheckpointError(f"tensor {e} is missing from the checkpoint; re-save it with save_pretrained().") from None
    ckpt.check_complete(graph)
    if cfg.decoder.tie_word_embeddings:
        ckpt.share_tied_head(graph)
    try:
        gen = GenerationConfig.from_pretrained(str(gen_dir), local_files_only=True) if (gen_dir / "generation_config.json").is_file() \
            else GenerationConfig.from_model_config(hf)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {str(gen_dir / 'generation_config.json')!r}: {e}; fix or delete it.") from None
    return EncDecModel(graph, hf, gen, be, path=folder if path is not None else None)
