"""One validator for everything a user hands encdec_fast: the checks behind every entry point.

load(), forward(), generate(), Engine.submit()/generate() and the CLI call these functions, and
nothing else checks the same things, so a value is judged the same way wherever it enters and nothing
invalid reaches a batch. Each check raises one encdec_fast error naming the value, the cause and the
fix: InvalidInputError for a bad argument; CheckpointError (passed as `err`) when the same tables
judge a checkpoint's config.json or generation_config.json.

  token_ids, attention_mask, labels, encoder_outputs    model inputs (dtype, shape, vocabulary, positions)
  GENERATION_FIELDS, generation_values, generation       generate() arguments: type, range, cross-checks
  stop_strings                                           stop strings (generate()'s stop_strings, the Engine's stop)
  bad_words_ids, special_id, generation_length           ids against the vocabulary, lengths against positions
  CONFIG_FIELDS, config_fields                           config.json fields of any family: type and range
  number, path                                           single arguments (load, Engine, CLI)
  decode_memory                                          a decode state against the device's free memory
  nonfinite_error                                        NaN/inf logits found at run time
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import CheckpointError, InvalidInputError, NumericalError

IGNORE_INDEX = -100  # labels: positions left out of the loss (transformers' CrossEntropy ignore_index)


# ------------------------------------------------------------------------------------------------
# single values: a Field says what a value must be
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    kind: str  # "int", "real", "bool", or "ids" (a token id or a non-empty list of them)
    lo: float | None = None  # lower bound, inclusive unless lo_open
    hi: float | None = None  # upper bound, inclusive
    lo_open: bool = False
    also: tuple = ()  # other accepted values (early_stopping="never")
    cap: int | None = None  # ints (each id): largest magnitude taken (an int64 limit, not part of the meaning)

    @property
    def magnitude(self):
        """The largest magnitude taken: cap, or for reals float32's largest (the decode tables are fp32)."""
        return self.cap if self.cap is not None or self.kind != "real" else REAL_MAX

    def describe(self) -> str:
        what = {"int": "an int", "real": "a number", "bool": "True or False", "ids": "an int or a non-empty list of ints"}
        out = what[self.kind]
        if self.lo is not None and self.hi is not None:
            out += f" in [{self.lo}, {self.hi}]"
        elif self.lo is not None:
            out += f" {'>' if self.lo_open else '>='} {self.lo}"
        return out + "".join(f" or {a!r}" for a in self.also)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _in_range(v, f: Field) -> bool:
    if f.lo is not None and (v <= f.lo if f.lo_open else v < f.lo):
        return False
    return f.hi is None or v <= f.hi


def number(value, name: str, field: Field, err=InvalidInputError, fix: str = ""):
    """Checks one value against its Field (None means unset and passes); returns it, a 0-d tensor as a
    Python number. name labels the value in the message; fix is appended to it."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if value is None or any(value is a or (isinstance(value, str) and value == a) for a in field.also):
        return value
    k = field.kind
    if k == "bool":
        ok = isinstance(value, bool)
    elif k == "int":
        ok = _is_int(value) and _in_range(value, field)
    elif k == "real":
        ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and _finite(value)
              and _in_range(value, field))
    else:  # ids
        ids = value if isinstance(value, (list, tuple)) else [value]
        ok = len(ids) > 0 and all(_is_int(i) and _in_range(i, field) for i in ids)
    if not ok:
        raise err(f"{name} must be {field.describe()}, got {_short(value)}" + (f"; {fix}" if fix else "."))
    values = value if isinstance(value, (list, tuple)) else [value]  # the value, or each id
    cap = field.magnitude
    if cap is not None and any(abs(v) > cap for v in values):
        signed = field.lo is None or field.lo < 0
        most = f"{'of magnitude ' if signed else 'and '}at most {_power(cap)}"
        raise err(f"{name} must be {field.describe()} {most}, got {_short(value)}" + (f"; {fix}" if fix else "."))
    return value


def _power(v) -> str:
    """2**63 - 1 reads better than 9223372036854775807; a float bound reads as 3.4e+38 (float32's largest)."""
    if isinstance(v, float):
        return f"{v:.3g} (float32's largest)"
    k = v.bit_length()
    return f"2**{k} - 1" if v == 2**k - 1 and k > 16 else str(v)


def _short(value) -> str:
    """repr(value), cut to a readable length (a request can carry a 1000-digit number)."""
    r = repr(value)
    return r if len(r) <= 80 else f"{r[:60]}... ({len(r)} characters)"


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


SEED = Field("int", 0, 2**64 - 1)  # what torch.Generator.manual_seed takes
# Upper bounds that keep every number an int64 on the device: a count (a length, a number of beams, a
# top_k) beyond any position table or vocabulary, so that sums with lengths stay far inside int64; a
# token id within int64 (whether it is inside the vocabulary is checked where the id is used).
COUNT_MAX = 2**31 - 1
REAL_MAX = float(torch.finfo(torch.float32).max)  # a real field's largest magnitude (the decode tables are fp32)
ID_MAX = 2**63 - 1


def path(value, name: str):
    """A checkpoint argument: None, a str (a folder or a Hub id) or an os.PathLike."""
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise InvalidInputError(f"{name} must be a folder path (a str or os.PathLike), got {type(value).__name__} "
                                f"{value!r}; a Hub id is a str too (\"org/name\").")
    return value


# ------------------------------------------------------------------------------------------------
# model inputs
# ------------------------------------------------------------------------------------------------
def _tensor(x, name: str, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (str, bytes)):
        raise InvalidInputError(f"{name} is a string; pass {what}.")
    try:
        return torch.as_tensor(x)
    except (ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise InvalidInputError(f"{name} must be {what} ({e}).") from None


def token_ids(x, name: str, stack, *, one_sequence: bool = False) -> torch.Tensor:
    """(B, L) long token ids, or (L,) with one_sequence (a (1, L) input is accepted too), on the input's
    device: integer, non-empty, inside the vocabulary of `stack` (a StackConfig), within its positions."""
    what = "one sequence of token ids (1-D)" if one_sequence else "a 2-D tensor (or nested list) of token ids"
    if x is None or isinstance(x, (str, bytes)):
        why = "is required" if x is None else "is a string (tokenize it first)"
        raise InvalidInputError(f"{name} {why}; pass {what}.")
    t = _tensor(x, name, what)
    if one_sequence:
        if t.dim() == 2 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 1:
            raise InvalidInputError(f"{name} must be one sequence of token ids (1-D), got shape {tuple(t.shape)}; "
                                    "submit each sequence as its own request.")
    elif t.dim() != 2:
        raise InvalidInputError(f"{name} must be 2-D (batch, length), got shape {tuple(t.shape)}; "
                                "for one sequence use ids.unsqueeze(0).")
    if t.numel() == 0:
        raise InvalidInputError(f"{name} is empty (shape {tuple(t.shape)}); pass at least one sequence of at least "
                                "one token.")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InvalidInputError(f"{name} must hold integer token ids, got dtype {t.dtype}; pass a torch.long tensor.")
    lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one host sync
    if lo < 0 or hi >= stack.vocab_size:
        raise InvalidInputError(f"{name} holds token id {lo if lo < 0 else hi}, outside the vocabulary "
                                f"[0, {stack.vocab_size}); check the tokenizer matches this checkpoint.")
    if t.shape[-1] > stack.max_length:
        raise InvalidInputError(f"{name} has length {t.shape[-1]} but the model has positions for at most "
                                f"{stack.max_length} tokens; truncate the input to {stack.max_length} tokens.")
    return t.long()


def attention_mask(mask, shape, name: str) -> torch.Tensor | None:
    """A 0/1 (or bool) mask shaped like the ids -> bool keep-mask on its device, or None when every
    position is kept (or no mask was given)."""
    if mask is None:
        return None
    m = _tensor(mask, name, "a 0/1 tensor shaped like the ids")
    if tuple(m.shape) != tuple(shape):
        raise InvalidInputError(f"{name} has shape {tuple(m.shape)} but the ids have {tuple(shape)}; they must match.")
    if m.dtype != torch.bool:
        if m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
            raise InvalidInputError(f"{name} must hold 0 (padding) and 1 (real token) only; other values would "
                                    "weight the attention, which encdec_fast does not do.")
        m = m != 0
    if not bool(m.any(dim=1).all()):
        raise InvalidInputError(f"{name} masks every token of some sequence; each sequence needs at least one real token.")
    return None if bool(m.all()) else m


def token_type_ids(x, shape, stack) -> torch.Tensor | None:
    """Token type ids shaped like the encoder's input ids -> long tensor on the input's device, or None
    (every token type 0, the default). stack: the encoder's StackConfig."""
    if x is None:
        return None
    if not stack.type_vocab_size:
        raise InvalidInputError(f"token_type_ids given, but this encoder ({stack.model_type}) has no token type "
                                "embeddings; drop token_type_ids (tokenize with return_token_type_ids=False).")
    t = _tensor(x, "token_type_ids", "integer token type ids shaped like input_ids")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InvalidInputError(f"token_type_ids must hold integers, got dtype {t.dtype}.")
    if tuple(t.shape) != tuple(shape):
        raise InvalidInputError(f"token_type_ids has shape {tuple(t.shape)} but input_ids has {tuple(shape)}; "
                                "they must match.")
    lo, hi = torch.stack(torch.aminmax(t)).tolist()
    if lo < 0 or hi >= stack.type_vocab_size:
        raise InvalidInputError(f"token_type_ids holds {lo if lo < 0 else hi}, outside [0, {stack.type_vocab_size}) "
                                "(the encoder's type_vocab_size).")
    return t.long()


def labels(x, stack, batch: int) -> torch.Tensor:
    """(B, T) long labels for the loss: ids inside the decoder's vocabulary or -100 (ignored), T within
    its positions, B the encoder batch."""
    t = _tensor(x, "labels", "a 2-D tensor of token ids (-100 where the loss ignores a position)")
    if t.dim() != 2 or t.numel() == 0:
        raise InvalidInputError(f"labels must be a non-empty 2-D (batch, length) tensor, got shape {tuple(t.shape)}.")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InvalidInputError(f"labels must hold integer token ids, got dtype {t.dtype}; pass a torch.long tensor.")
    if t.shape[0] != batch:
        raise InvalidInputError(f"labels has batch {t.shape[0]} but the encoder input has {batch}; they must match.")
    V = stack.vocab_size
    bad = ((t < 0) | (t >= V)) & (t != IGNORE_INDEX)
    if bool(bad.any()):
        raise InvalidInputError(f"labels hold {int(t[bad][0])}, neither a token id in [0, {V}) nor {IGNORE_INDEX} "
                                "(ignored position); check the tokenizer and the padding value of the labels.")
    if t.shape[1] > stack.max_length:
        raise InvalidInputError(f"labels have length {t.shape[1]} but the decoder has positions for at most "
                                f"{stack.max_length} tokens; truncate them.")
    return t.long()


def encoder_outputs(x, width: int, name: str = "encoder_outputs") -> torch.Tensor:
    """The encoder's last hidden state (B, S, width), from a tensor, a tuple holding it first, or a ModelOutput."""
    enc = x[0] if isinstance(x, (tuple, list)) and len(x) else getattr(x, "last_hidden_state", x)
    if not isinstance(enc, torch.Tensor):
        raise InvalidInputError(f"{name} must be a tensor (batch, source length, {width}), a tuple holding one "
                                f"first, or the encoder's ModelOutput; got {type(x).__name__}.")
    if not enc.is_floating_point() or enc.dim() != 3 or enc.shape[-1] != width or enc.shape[0] * enc.shape[1] == 0:
        raise InvalidInputError(f"{name} must be a non-empty floating tensor (batch, source length, {width}) "
                                f"(the hidden size it feeds), got {enc.dtype} {tuple(enc.shape)}.")
    return enc


# ------------------------------------------------------------------------------------------------
# generation arguments (kwargs, a GenerationConfig, the checkpoint's generation_config.json)
# ------------------------------------------------------------------------------------------------
GENERATION_FIELDS = {
    "max_length": Field("int", 1, cap=COUNT_MAX),
    "max_new_tokens": Field("int", 1, cap=COUNT_MAX),
    "min_length": Field("int", 0, cap=COUNT_MAX),
    "min_new_tokens": Field("int", 0, cap=COUNT_MAX),
    "num_beams": Field("int", 1, cap=COUNT_MAX),
    "num_return_sequences": Field("int", 1, cap=COUNT_MAX),
    "no_repeat_ngram_size": Field("int", 0, cap=COUNT_MAX),
    "top_k": Field("int", 0, cap=COUNT_MAX),
    "temperature": Field("real", 0),
    "top_p": Field("real", 0, 1),
    "repetition_penalty": Field("real", 0, lo_open=True),
    "length_penalty": Field("real"),
    "max_time": Field("real", 0, lo_open=True),
    "do_sample": Field("bool"),
    "early_stopping": Field("bool", also=("never",)),
    "use_cache": Field("bool"),
    "return_dict_in_generate": Field("bool"),
    "output_scores": Field("bool"),
    "output_logits": Field("bool"),
    # types and int64 only: the ids used are checked against the vocabulary by special_id() (eos ids
    # outside it are allowed, as in transformers: they never stop a sequence)
    "pad_token_id": Field("int", cap=ID_MAX),
    "bos_token_id": Field("int", cap=ID_MAX),
    "eos_token_id": Field("ids", cap=ID_MAX),
    "decoder_start_token_id": Field("ids", cap=ID_MAX),
    "forced_eos_token_id": Field("ids", 0, cap=ID_MAX),
}


def generation_values(values: Mapping, source: str = "", err=InvalidInputError, fix: str = ""):
    """Type and range of every known generation field in `values` (kwargs or a config's dict)."""
    for name, field in GENERATION_FIELDS.items():
        if name in values:
            number(values[name], source + name, field, err, fix)


def stop_strings(value, name: str) -> tuple[str, ...]:
    """Stop strings: one non-empty string or a non-empty list of them -> a tuple."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(s, str) and s for s in items):
        raise InvalidInputError(f"{name} must be a non-empty string or a non-empty list of non-empty strings, got "
                                f"{value!r}.")
    return tuple(items)


def generation(gc, vocab_size: int):
    """What a resolved GenerationConfig must satisfy beyond single fields (the logits processors rely on
    it): sampling temperature, and the ids the processors write or ban inside the vocabulary."""
    if gc.do_sample and gc.temperature is not None and not gc.temperature > 0:
        raise InvalidInputError(f"temperature must be a strictly positive float when sampling, got {gc.temperature!r}; "
                                "for greedy decoding set do_sample=False.")
    if (gc.num_beams or 1) > 1 and gc.length_penalty is None:  # beam scores divide by length ** length_penalty
        raise InvalidInputError("length_penalty is None but beam search needs a number; pass one (1.0 is the default) "
                                "or leave it out.")
    bad_words_ids(gc.bad_words_ids, vocab_size)
    forced = gc.forced_eos_token_id
    if forced is not None:  # the step sets these ids' scores: each must be a column of the logits
        forced = forced.tolist() if isinstance(forced, torch.Tensor) else forced
        for i in forced if isinstance(forced, (list, tuple)) else [forced]:
            special_id(i, "forced_eos_token_id", vocab_size, "pass forced_eos_token_id=None or a token id of this "
                       "decoder to generate() (or fix the checkpoint's generation_config.json)")


def bad_words_ids(words, vocab_size: int | None = None):
    """None, or a non-empty list of non-empty lists of token ids (inside [0, vocab_size) when given)."""
    if words is None:
        return words
    if (not isinstance(words, (list, tuple)) or not words
            or any(not isinstance(w, (list, tuple)) or not w or not all(_is_int(i) for i in w) for w in words)):
        raise InvalidInputError(f"bad_words_ids must be a non-empty list of non-empty lists of token ids, got "
                                f"{_short(words)}.")
    for w in words:
        if any(i < 0 or (vocab_size is not None and i >= vocab_size) for i in w):
            raise InvalidInputError(f"bad_words_ids holds {_short(list(w))}, outside the vocabulary "
                                    f"[0, {vocab_size or 'vocab_size'}).")
    return words


def special_id(value: int, name: str, vocab_size: int, fix: str = "") -> int:
    """A token id the decoder is fed or emits (decoder start, padding): inside the vocabulary."""
    if not _is_int(value) or not 0 <= value < vocab_size:
        fix = fix or f"pass a valid {name}=... to generate() (or fix the checkpoint's generation_config.json)"
        raise InvalidInputError(f"{name}={value!r} is outside the decoder's vocabulary [0, {vocab_size}); {fix}.")
    return int(value)


def generation_length(max_length: int, prefix: int, positions: int):
    """The decoder prefix (decoder start included) leaves room to generate, within the position table."""
    if prefix >= max_length:
        raise InvalidInputError(f"decoder_input_ids has length {prefix} (decoder start included) but max_length is "
                                f"{max_length}; increase max_length or, better, set max_new_tokens.")
    if max_length - 1 > positions:  # the last token is never fed back
        raise InvalidInputError(
            f"max_length {max_length} (prefix {prefix} + new tokens) needs {max_length - 1} decoder positions but the "
            f"decoder has {positions}; lower max_new_tokens to at most {positions + 1 - prefix}.")


# ------------------------------------------------------------------------------------------------
# checkpoint metadata: config.json fields by name, whatever the family (configs share these names)
# ------------------------------------------------------------------------------------------------
_SIZES = ("vocab_size", "hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer", "encoder_layers",
          "decoder_layers", "num_attention_heads", "n_head", "encoder_attention_heads", "decoder_attention_heads",
          "intermediate_size", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings",
          "n_positions", "type_vocab_size", "embedding_size", "cross_attention_hidden_size")
CONFIG_FIELDS = {
    **{name: Field("int", 1) for name in _SIZES},
    "layer_norm_eps": Field("real", 0, lo_open=True),
    "layer_norm_epsilon": Field("real", 0, lo_open=True),
    **{name: Field("ids") for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")},
}


def config_fields(raw: Mapping, file, prefix: str = ""):
    """config.json as parsed JSON: the known fields' type and range, in the encoder and decoder too."""
    fix = "fix the file or re-save the checkpoint with save_pretrained()"
    for name, field in CONFIG_FIELDS.items():
        if name in raw:
            number(raw[name], f"{str(file)!r}: {prefix}{name}", field, CheckpointError, fix)
    for role in ("encoder", "decoder"):
        if role in raw and not prefix:
            if not isinstance(raw[role], Mapping):
                raise CheckpointError(f"{str(file)!r}: {role} must be a JSON object (the {role}'s config), got "
                                      f"{type(raw[role]).__name__}; {fix}.")
            config_fields(raw[role], file, prefix=f"{role}.")


# ------------------------------------------------------------------------------------------------
# run time
# ------------------------------------------------------------------------------------------------
def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can take on device: CUDA's free memory plus what torch's allocator holds
    unused; the CPU's MemAvailable (Linux). None where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def decode_memory(nbytes: int, device: torch.device, what: str):
    """A decode state of nbytes must fit the device's free memory: refused before it is allocated (a
    request of 10^6 beams fails here, not in the allocator, and fails alone)."""
    free = available_memory(device)
    if free is not None and nbytes > free:
        raise InvalidInputError(f"{what} needs {nbytes / 2**30:.2f} GiB of decode state, more than the "
                                f"{free / 2**30:.2f} GiB free on {device}; lower num_beams, num_return_sequences, "
                                "max_new_tokens or the batch size.")


def nonfinite_error() -> NumericalError:
    return NumericalError("the model produced NaN or inf logits (float16 overflow, or non-finite weights loaded with "
                          "check_finite=False); load the model with dtype=torch.bfloat16 or torch.float32, or check "
                          "the weights.")
