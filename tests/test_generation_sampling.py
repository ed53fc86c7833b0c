"""Logits processors and sampling: each processor equals its transformers class on the same inputs,
the pipeline has transformers' order, sampled generation with a seed equals transformers' (same RNG
draws, same processed scores), a seed reproduces our output, and top-k/top-p never emit a masked token."""


import pytest
import torch
import transformers.generation.logits_process as LP
from conftest import beam_sampling_draws, hf_model
from transformers import GenerationConfig

import encdec_fast
from encdec_fast.decode import select as P
from encdec_fast.decode.params import resolve_config

V = 97


pytestmark = pytest.mark.usefixtures("quiet")


@pytest.fixture(scope="module")
def pair(make_ckpt):
    cache = {}

    def get(enc, dec, **kw):
        key = (enc, dec, repr(sorted(kw.items())))
        if key not in cache:
            path = make_ckpt(enc, dec, **kw)
            cache[key] = (encdec_fast.load(path, device="cpu"), hf_model(path))
        return cache[key]

    return get


def scores_and_ids(N=6, t=11, seed=0, repeats=True):
    """Random fp32 scores (N, V) with ties and negatives, and ids (N, t) with repeated n-grams."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(N, V, generator=g) * 3
    scores[:, 10:14] = scores[:, 10:11]  # ties
    ids = torch.randint(0, V, (N, t), generator=g)
    if repeats and t >= 8:
        ids[:, 6:8] = ids[:, 1:3]  # the 2-gram at 1:3 reappears, so its successor is banned for n=3
        ids[:, -2:] = ids[:, 2:4]
    return ids, scores


def ours(ids, scores, cfgs):
    """decode/select.py's processors, one RowConfig per row (or one for all), over a static token
    buffer whose slots past t hold junk that must not matter."""
    N, t = ids.shape
    cfgs = cfgs if isinstance(cfgs, list) else [cfgs] * N
    tab = P.RowTables(N, V, "cpu")
    for n, c in enumerate(cfgs):
        tab.assign(torch.tensor([n]), c, ids[n:n + 1])
    seq = torch.randint(0, V, (N, t + 5), generator=torch.Generator().manual_seed(9))
    seq[:, :t] = ids
    return P.process(scores, seq, torch.full((N,), t), tab, P.Spec.of(cfgs))


def cfg(**kw):
    return P.RowConfig(eos=kw.pop("eos", None), pad=0, **kw)


def check(c, theirs, ids, scores):
    a = theirs(ids, scores.clone())
    b = ours(ids, scores.clone(), c)
    assert torch.equal(torch.isinf(a), torch.isinf(b)), "masked tokens differ"
    assert torch.equal(a, b), f"max diff {(a - b).nan_to_num(0, 0, 0).abs().max():.2e}"


@pytest.mark.parametrize("penalty", [1.3, 0.7])
@pytest.mark.parametrize("t", [1, 9])
def test_repetition_penalty_matches_transformers(penalty, t):
    ids, scores = scores_and_ids(t=t)
    check(cfg(penalty=penalty), LP.RepetitionPenaltyLogitsProcessor(penalty), ids, scores)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("t", [2, 11, 30])
def test_no_repeat_ngram_matches_transformers(n, t):
    ids, scores = scores_and_ids(t=t)
    check(cfg(ngram=n), LP.NoRepeatNGramLogitsProcessor(n), ids, scores)


def test_no_repeat_ngram_bans_a_repeated_trigram_per_row():
    ids = torch.tensor([[5, 6, 7, 1, 5, 6], [5, 6, 8, 9, 9, 9]])
    out = ours(ids, torch.zeros(2, V), cfg(ngram=3))
    assert torch.isinf(out[0, 7]) and torch.isinf(out).sum() == 2  # row 0: "5 6" -> 7; row 1: "9 9" -> 9
    assert torch.isinf(out[1, 9])


@pytest.mark.parametrize("eos", [None, [2], [2, 5]])
@pytest.mark.parametrize("t", [1, 2, 9])
def test_bad_words_match_transformers(eos, t):
    ids, scores = scores_and_ids(t=t)
    bad = [[5], [2], [int(ids[0, -1]), 40], [int(ids[1, -1]), 41], [int(ids[1, -2 % t]), int(ids[1, -1]), 42], [7, 8],
           [60, 61, 62, 63]]
    single, multi = P._bad_words(bad, eos, V)
    check(cfg(eos=eos, bad_single=single, bad_multi=multi), LP.NoBadWordsLogitsProcessor(bad, eos), ids, scores)


@pytest.mark.parametrize("t", [3, 8])
def test_min_length_and_min_new_tokens_match_transformers(t):
    ids, scores = scores_and_ids(t=t)
    eos = [2, 9]
    check(cfg(eos=eos, min_len=5), LP.MinLengthLogitsProcessor(5, eos), ids, scores)
    check(cfg(eos=eos, min_len=2 + 4), LP.MinNewTokensLengthLogitsProcessor(2, 4, eos), ids, scores)


@pytest.mark.parametrize("eos", [2, [2, 9]])
def test_forced_eos_matches_transformers(eos):
    for t in (1, 9, 10, 11):  # forced at t == max_length - 1 == 10 only
        ids, scores = scores_and_ids(t=t)
        eos_list = [eos] if isinstance(eos, int) else eos
        check(cfg(forced_eos=eos_list, forced_at=10), LP.ForcedEOSTokenLogitsProcessor(11, eos), ids, scores)


@pytest.mark.parametrize("keep", [1, 3])
def test_warpers_match_transformers(keep):
    ids, scores = scores_and_ids()
    check(cfg(do_sample=True, temperature=0.7), LP.TemperatureLogitsWarper(0.7), ids, scores)
    for k in (1, 5, 13, 200):
        check(cfg(do_sample=True, top_k=max(k, keep), min_keep=keep), LP.TopKLogitsWarper(k, min_tokens_to_keep=keep),
              ids, scores)
    for p in (0.0, 0.3, 0.9, 1.0):
        check(cfg(do_sample=True, top_p=p, min_keep=keep), LP.TopPLogitsWarper(p, min_tokens_to_keep=keep), ids, scores)


def test_rows_with_different_settings_each_match_their_own_processors():
    """One call over rows of different requests (the Engine's case) equals each row processed alone."""
    ids, scores = scores_and_ids(N=4, t=11)
    rows = [cfg(penalty=1.4, ngram=2), cfg(), cfg(do_sample=True, top_k=5, temperature=0.5, eos=[3], min_len=20),
            cfg(do_sample=True, top_p=0.6, ngram=3, bad_single=[7], bad_multi=[(int(ids[3, -1]), 8)])]
    theirs = [[LP.RepetitionPenaltyLogitsProcessor(1.4), LP.NoRepeatNGramLogitsProcessor(2)], [],
              [LP.MinLengthLogitsProcessor(20, [3]), LP.TemperatureLogitsWarper(0.5), LP.TopKLogitsWarper(5)],
              [LP.NoRepeatNGramLogitsProcessor(3), LP.NoBadWordsLogitsProcessor([[7], [int(ids[3, -1]), 8]], None),
               LP.TopPLogitsWarper(0.6)]]
    got = ours(ids, scores.clone(), rows)
    for n, procs in enumerate(theirs):
        want = scores[n:n + 1].clone()
        for proc in procs:
            want = proc(ids[n:n + 1], want)
        assert torch.equal(got[n:n + 1], want), f"row {n}"


GC_CASES = [
    dict(repetition_penalty=1.2, no_repeat_ngram_size=2, bad_words_ids=[[4], [9, 10]], min_new_tokens=3,
         do_sample=True, temperature=0.8, top_k=20, top_p=0.9),
    dict(min_length=20, do_sample=True, num_beams=3, top_k=2, top_p=0.5),  # beams keep len(eos)+1 tokens
    dict(no_repeat_ngram_size=3, num_beams=2, length_penalty=0.5),
    dict(min_new_tokens=2, forced_eos_token_id=7, do_sample=True, top_k=5),
    dict(do_sample=True),  # the default top_k=50
]


@pytest.mark.parametrize("kw", GC_CASES)
def test_settings_from_a_generation_config_match_transformers_get_logits_processor(pair, kw):
    ours_model, hf = pair("bert", "gpt2")
    kw = dict(max_new_tokens=10, eos_token_id=[2, 7]) | kw
    gc, _, _ = resolve_config(ours_model, None, kw)
    gc.min_length = gc.min_new_tokens + 2 if gc.min_new_tokens else gc.min_length  # prompt length 2
    gc.max_length = 12  # max_new_tokens 10 + prompt length 2
    c = P.RowConfig.from_generation_config(gc, prompt_len=2, eos=[2, 7], pad=0, vocab_size=V)
    hgc, _ = hf._prepare_generation_config(None, **kw)
    hf._prepare_special_tokens(hgc, True, device="cpu", batch_size=6)
    hgc.min_length, hgc.max_length = gc.min_length, gc.max_length
    theirs = hf._get_logits_processor(generation_config=hgc, input_ids_seq_length=2, encoder_input_ids=None,
                                      device="cpu", model_kwargs={})
    for t in (2, 4, 11):  # 11 == max_length - 1: forced eos
        ids, scores = scores_and_ids(t=t)
        check(c, theirs, ids, scores)


SAMPLING = [
    dict(),  # top_k 50 by default
    dict(top_k=5, temperature=0.7),
    dict(top_k=0, top_p=0.8, temperature=1.3),
    dict(top_p=0.9, num_return_sequences=2, repetition_penalty=1.2, no_repeat_ngram_size=2),
    pytest.param(dict(num_beams=3, top_k=10), marks=beam_sampling_draws),  # beam sampling
    pytest.param(dict(num_beams=2, num_return_sequences=2, top_p=0.7, eos_token_id=[2, 24]), marks=beam_sampling_draws),
]


@pytest.mark.parametrize("enc,dec,ckpt", [("bert", "gpt2", {}), ("roberta", "roberta", dict(std=0.1))])
@pytest.mark.parametrize("kw", SAMPLING)
def test_sampling_with_a_seed_matches_transformers(pair, enc, dec, ckpt, kw):
    """Same RNG draws as transformers (one multinomial per step over the same processed scores), so
    with the same seed the tokens match, and the processed scores agree to fp32 accuracy."""
    ours, hf = pair(enc, dec, **ckpt)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, V, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    kw = dict(do_sample=True, max_new_tokens=12, return_dict_in_generate=True, output_scores=True) | kw
    torch.manual_seed(123)
    a = hf.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(123)
    b = ours.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(a.sequences, b.sequences), (a.sequences.tolist(), b.sequences.tolist())
    assert len(a.scores) == len(b.scores)
    for x, y in zip(a.scores, b.scores):
        assert torch.equal(torch.isinf(x), torch.isinf(y))
        fin = torch.isfinite(x)
        assert (x[fin] - y[fin]).abs().max() < 1e-4
    if kw.get("num_beams", 1) > 1:
        assert (a.sequences_scores - b.sequences_scores).abs().max() < 1e-4


def test_a_seed_reproduces_our_sampling(pair):
    ours, _ = pair("bert", "gpt2")
    ids = torch.randint(4, V, (2, 6), generator=torch.Generator().manual_seed(2))
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(ours.generate(ids, do_sample=True, top_k=0, max_new_tokens=16, eos_token_id=None))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_k=0, top_p=0.5), dict(top_k=4, top_p=0.6, temperature=2.0)])
def test_top_k_top_p_never_emit_a_masked_token(pair, kw):
    ours, _ = pair("bert", "gpt2")
    ids = torch.randint(4, V, (4, 6), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    out = ours.generate(ids, do_sample=True, max_new_tokens=20, eos_token_id=None, return_dict_in_generate=True,
                        output_scores=True, num_return_sequences=3, **kw)
    for step, s in enumerate(out.scores):
        tok = out.sequences[:, 1 + step]
        assert torch.isfinite(s.gather(1, tok[:, None])).all(), f"step {step} sampled a masked token"
        if "top_k" in kw and kw["top_k"]:
            assert (torch.isfinite(s).sum(dim=1) <= kw["top_k"]).all()


def test_generation_config_with_sampling_options_in_file_matches_transformers(pair):
    ours, hf = pair("bert", "gpt2", gen_kw={"do_sample": True, "top_k": 7, "temperature": 0.9})
    ids = torch.randint(4, V, (2, 5), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    a = hf.generate(ids, max_new_tokens=10)
    torch.manual_seed(5)
    b = ours.generate(ids, max_new_tokens=10)
    assert torch.equal(a, b)
    gc = GenerationConfig(do_sample=False)
    assert torch.equal(hf.generate(ids, generation_config=gc, max_new_tokens=10),
                       ours.generate(ids, generation_config=gc, max_new_tokens=10))
