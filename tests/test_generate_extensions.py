"""generate()'s host-side arguments, side by side with transformers on the same checkpoint: streamer
(TextStreamer's printed text, TextIteratorStreamer read in a thread, the raw put() calls), stopping
criteria (stop_strings with a tokenizer, max_time, EosTokenCriteria, a caller's own StoppingCriteria;
greedy, sampling, several sequences, beam search), the caller's own logits processors (greedy, seeded
sampling, beam search, with the built-in processors and warpers around them), and encoder_outputs= (the
encoder skipped). Every comparison runs transformers' generate() in the same test."""

import shutil
import threading

import pytest
import torch
import transformers as T
from conftest import beam_sampling_draws, hf_model
from transformers.generation import (
    EosTokenCriteria,
    LogitsProcessor,
    LogitsProcessorList,
    MaxLengthCriteria,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    SuppressTokensLogitsProcessor,
)
from transformers.modeling_outputs import BaseModelOutput

import encdec_fast
from encdec_fast import InvalidInputError, UnsupportedArgumentError
from encdec_fast.decode.params import resolve

pytestmark = pytest.mark.usefixtures("quiet")

# a WordPiece vocabulary of the checkpoint's 97 ids; "abcdef" is one token because StopStringCriteria
# finds each token's text by decoding it after "abcdef"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(91)] + ["abcdef"]
BATCH = torch.tensor([[5, 6, 7, 8, 9], [11, 12, 13, 14, 15], [20, 21, 22, 23, 24]])
ONE = BATCH[:1]


@pytest.fixture(scope="module")
def folder(make_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("with_tokenizer") / "bert2gpt2"
    shutil.copytree(make_ckpt("bert", "gpt2"), path)
    T.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok(folder):
    return T.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def hf(folder):
    return hf_model(folder)


@pytest.fixture(scope="module")
def ours(folder):
    return encdec_fast.load(folder, device="cpu")


def run_both(hf, ours, ids, seed=None, **kw):
    """(transformers' output, ours) for the same call; seed: torch.manual_seed before each."""
    outs = []
    for m in (hf, ours):
        if seed is not None:
            torch.manual_seed(seed)
        outs.append(m.generate(ids, **kw))
    return outs


def assert_same_tokens(want, got, what=""):
    want = getattr(want, "sequences", want)
    got = getattr(got, "sequences", got)
    assert want.shape == got.shape and torch.equal(want, got), f"{what}\ntransformers {want.tolist()}\nours {got.tolist()}"


# ------------------------------------------------------------------------------------------------
# streamer
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(max_new_tokens=8),
    dict(max_new_tokens=8, skip_prompt=True),
    dict(max_new_tokens=9, do_sample=True, top_k=30, seed=11, skip_special_tokens=True),
])
def test_text_streamer_prints_what_transformers_prints(hf, ours, tok, capsys, kw):
    kw = dict(kw)
    seed = kw.pop("seed", None)
    streamer_kw = {k: kw.pop(k) for k in ("skip_prompt", "skip_special_tokens") if k in kw}
    printed = []
    for m in (hf, ours):
        if seed is not None:
            torch.manual_seed(seed)
        out = m.generate(ONE, streamer=T.TextStreamer(tok, **streamer_kw), **kw)
        printed.append((capsys.readouterr().out, out))
    (want, want_ids), (got, got_ids) = printed
    assert got == want and want.strip(), (want, got)
    assert_same_tokens(want_ids, got_ids)


def test_text_iterator_streamer_in_a_thread_yields_transformers_chunks(hf, ours, tok):
    def consume(m):
        streamer = T.TextIteratorStreamer(tok, skip_prompt=True)
        torch.manual_seed(5)
        worker = threading.Thread(target=m.generate, args=(ONE,),
                                  kwargs=dict(max_new_tokens=10, do_sample=True, streamer=streamer))
        worker.start()
        chunks = list(streamer)
        worker.join()
        return chunks

    want, got = consume(hf), consume(ours)
    assert got == want and "".join(want).strip(), (want, got)


class Recorder(T.generation.streamers.BaseStreamer):
    """Every put() and end(), as lists."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(value.tolist())

    def end(self):
        self.calls.append("end")


def test_a_streamer_gets_transformers_puts_for_a_batch_with_finished_rows(hf, ours):
    want, got = Recorder(), Recorder()
    hf.generate(BATCH, max_new_tokens=12, eos_token_id=26, streamer=want)  # eos = w21: rows finish and are padded
    ours.generate(BATCH, max_new_tokens=12, eos_token_id=26, streamer=got)
    assert got.calls == want.calls
    assert want.calls[-1] == "end" and any(0 in c for c in want.calls[2:-1]), "no row was padded after it finished"


def test_streamer_is_refused_where_transformers_refuses_it(ours, tok):
    with pytest.raises(UnsupportedArgumentError, match="beam search"):
        ours.generate(ONE, max_new_tokens=3, num_beams=2, streamer=Recorder())
    with pytest.raises(UnsupportedArgumentError, match="TextStreamer streams one sequence"):
        ours.generate(BATCH, max_new_tokens=3, streamer=T.TextStreamer(tok))
    with pytest.raises(InvalidInputError, match="put"):
        ours.generate(ONE, max_new_tokens=3, streamer=object())


# ------------------------------------------------------------------------------------------------
# stopping criteria
# ------------------------------------------------------------------------------------------------
STOP_CASES = [
    dict(stop_strings=["w79"]),  # greedy, one input: stops after two tokens
    dict(stop_strings=["w21"]),  # a batch: finished rows are padded (eos criterion present)
    dict(stop_strings=["w21", "w79"], eos_token_id=None),  # no eos criterion: finished rows keep generating
    dict(stop_strings="w21", do_sample=True, seed=3),
    dict(stop_strings=["w21", "w30"], do_sample=True, num_return_sequences=2, seed=3),
    dict(stop_strings=["w16 w21", "w79"], eos_token_id=None),  # a stop string across tokens
    dict(stop_strings=["w21"], num_beams=3),
    dict(stop_strings=["w21"], num_beams=2, num_return_sequences=2, output_scores=True, return_dict_in_generate=True),
]


@pytest.mark.parametrize("kw", STOP_CASES)
def test_stop_strings_give_transformers_tokens(hf, ours, tok, kw):
    kw = dict(kw)
    ids = ONE if kw["stop_strings"] == ["w79"] else BATCH
    want, got = run_both(hf, ours, ids, seed=kw.pop("seed", None), max_new_tokens=12, tokenizer=tok, **kw)
    assert_same_tokens(want, got, kw)
    if kw.get("output_scores"):
        assert len(got.scores) == len(want.scores)
        for a, b in zip(want.scores, got.scores):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_stop_strings_stop_early_and_end_at_the_stop(hf, ours, tok):
    """The cases above do stop: the one input ends at its stop string, the batch's rows pad after theirs."""
    got = ours.generate(ONE, max_new_tokens=12, stop_strings=["w79"], tokenizer=tok)
    assert got.shape[1] < 13 and tok.decode(got[0]).endswith("w79")
    full = ours.generate(BATCH, max_new_tokens=12)
    got = ours.generate(BATCH, max_new_tokens=12, stop_strings=["w21"], tokenizer=tok)
    assert not torch.equal(got, full[:, :got.shape[1]]), "no row stopped at its stop string"


def test_stop_strings_with_a_vocabulary_transformers_cannot_build_its_criteria_for(hf, ours, tok):
    """Without the token "abcdef", transformers' StopStringCriteria cannot be built for a WordPiece vocabulary
    (its generate() raises ValueError): ours then matches the decoded text (decode/host.py's TextStopCriteria),
    stopping where the criteria that transformers builds for the same words with "abcdef" stop."""
    plain = T.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB[:-1])})
    with pytest.raises(ValueError):
        hf.generate(ONE, max_new_tokens=12, stop_strings=["w79"], tokenizer=plain)
    for stop in (["w79"], ["w21"]):
        want = ours.generate(BATCH, max_new_tokens=12, stop_strings=stop, tokenizer=tok)  # StopStringCriteria
        assert torch.equal(ours.generate(BATCH, max_new_tokens=12, stop_strings=stop, tokenizer=plain), want), stop


def test_stop_strings_need_the_tokenizer(ours):
    with pytest.raises(InvalidInputError, match="tokenizer="):
        ours.generate(ONE, max_new_tokens=3, stop_strings=["w1"])
    with pytest.raises(InvalidInputError, match="stop_strings must be"):
        ours.generate(ONE, max_new_tokens=3, stop_strings=[""], tokenizer=object())


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=2), dict(do_sample=True, seed=2)])
def test_max_time_stops_rows_early_at_a_prefix_of_transformers_output(hf, ours, kw):
    """A tiny max_time: one step runs, then every row stops (no timing assertion beyond that); a generous
    one changes nothing."""
    kw = dict(kw)
    seed = kw.pop("seed", None)
    want, got = run_both(hf, ours, BATCH, seed=seed, max_new_tokens=10, max_time=1e-9, **kw)
    assert_same_tokens(want, got, "max_time=1e-9")
    assert got.shape[1] < BATCH.shape[0] + 10
    want, got = run_both(hf, ours, BATCH, seed=seed, max_new_tokens=10, max_time=300.0, **kw)
    assert_same_tokens(want, got, "max_time=300")
    full = run_both(hf, ours, BATCH, seed=seed, max_new_tokens=10, **kw)[1]
    assert torch.equal(got, full)


@pytest.mark.parametrize("kw", [dict(eos_token_id=None), dict(eos_token_id=None, do_sample=True, seed=8),
                                dict(eos_token_id=26)])
def test_eos_token_criteria_stops_as_in_transformers(hf, ours, kw):
    kw = dict(kw)
    crit = StoppingCriteriaList([EosTokenCriteria(eos_token_id=26)])
    want, got = run_both(hf, ours, BATCH, seed=kw.pop("seed", None), max_new_tokens=12, stopping_criteria=crit, **kw)
    assert_same_tokens(want, got, kw)


class LastTokenIn(StoppingCriteria):
    """A caller's criterion: a row stops once its last token is one of `ids`."""

    def __init__(self, ids):
        self.ids = torch.tensor(ids)

    def __call__(self, input_ids, scores, **kwargs):
        return torch.isin(input_ids[:, -1], self.ids.to(input_ids.device))


@pytest.mark.parametrize("kw", [dict(), dict(eos_token_id=None), dict(do_sample=True, num_return_sequences=2, seed=4),
                                dict(num_beams=3), dict(num_beams=2, eos_token_id=None)])
def test_a_callers_stopping_criteria_give_transformers_tokens(hf, ours, kw):
    kw = dict(kw)
    crit = StoppingCriteriaList([LastTokenIn([26, 84])])
    want, got = run_both(hf, ours, BATCH, seed=kw.pop("seed", None), max_new_tokens=12, stopping_criteria=crit, **kw)
    assert_same_tokens(want, got, kw)


def test_stopping_criteria_that_transformers_would_run_in_place_of_ours_are_refused(ours):
    with pytest.raises(UnsupportedArgumentError, match="max_new_tokens"):
        ours.generate(ONE, max_new_tokens=3, stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(5)]))
    with pytest.raises(UnsupportedArgumentError, match="eos_token_id="):
        ours.generate(ONE, max_new_tokens=3, eos_token_id=2, stopping_criteria=[EosTokenCriteria(eos_token_id=26)])
    with pytest.raises(InvalidInputError, match="pad_token_id"):
        ours.generate(ONE, max_new_tokens=3, eos_token_id=None, pad_token_id=None,
                      stopping_criteria=[EosTokenCriteria(eos_token_id=26)])
    with pytest.raises(InvalidInputError, match="StoppingCriteriaList"):
        ours.generate(ONE, max_new_tokens=3, stopping_criteria=LastTokenIn([5]))


# ------------------------------------------------------------------------------------------------
# a caller's logits processors
# ------------------------------------------------------------------------------------------------
class BanLastToken(LogitsProcessor):
    """A caller's processor that reads input_ids: a row may not repeat its last token."""

    def __call__(self, input_ids, scores):
        return scores.scatter(1, input_ids[:, -1:], float("-inf"))


PROCESSOR_CASES = [
    dict(),
    dict(repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=4),  # built-ins first, then the caller's
    dict(do_sample=True, top_k=12, temperature=0.7, seed=21),  # the caller's before the warpers
    dict(do_sample=True, top_p=0.8, num_return_sequences=2, seed=22),
    dict(num_beams=3),
    dict(num_beams=3, num_return_sequences=2, length_penalty=0.7, output_scores=True, return_dict_in_generate=True),
    dict(output_scores=True, return_dict_in_generate=True),
]


@pytest.mark.parametrize("kw", PROCESSOR_CASES)
def test_a_callers_logits_processors_give_transformers_tokens(hf, ours, kw):
    kw = dict(kw)
    procs = LogitsProcessorList([SuppressTokensLogitsProcessor([84, 31]), BanLastToken()])
    want, got = run_both(hf, ours, BATCH, seed=kw.pop("seed", None), max_new_tokens=10, logits_processor=procs, **kw)
    assert_same_tokens(want, got, kw)
    plain = ours.generate(BATCH, max_new_tokens=10, **{k: v for k, v in kw.items() if k != "seed"})
    assert not torch.equal(getattr(plain, "sequences", plain), getattr(got, "sequences", got))
    if kw.get("output_scores"):
        assert len(got.scores) == len(want.scores)
        for a, b in zip(want.scores, got.scores):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@beam_sampling_draws
def test_a_callers_logits_processors_with_beam_sampling(hf, ours):
    procs = LogitsProcessorList([BanLastToken()])
    want, got = run_both(hf, ours, BATCH, seed=31, max_new_tokens=8, num_beams=2, do_sample=True, top_k=20,
                         logits_processor=procs)
    assert_same_tokens(want, got)


def test_host_work_on_graph_shaped_states_matches_transformers(hf, ours, tok):
    """The bucketed states CUDA decodes in (more rows than the batch: 3 inputs x 3 beams in 16 rows),
    run eagerly on the CPU: processors, stop strings and criteria on beam candidates."""
    procs = LogitsProcessorList([BanLastToken()])
    cases = [dict(logits_processor=procs), dict(logits_processor=procs, num_beams=3),
             dict(stop_strings=["w21"], tokenizer=tok, num_beams=3), dict(stop_strings=["w21"], tokenizer=tok)]
    ours.graph_shapes = True
    try:
        for kw in cases:
            want, got = run_both(hf, ours, BATCH, max_new_tokens=9, **kw)
            assert_same_tokens(want, got, kw)
    finally:
        ours.graph_shapes = False


def test_a_processor_generate_also_builds_is_refused_unless_its_setting_is_off(hf, ours):
    with pytest.raises(UnsupportedArgumentError, match="repetition_penalty="):
        ours.generate(ONE, max_new_tokens=3, repetition_penalty=1.2,
                      logits_processor=[RepetitionPenaltyLogitsProcessor(1.5)])
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)])  # the setting is off: appended
    want, got = run_both(hf, ours, BATCH, max_new_tokens=8, logits_processor=procs)
    assert_same_tokens(want, got)
    with pytest.raises(InvalidInputError, match="callables"):
        ours.generate(ONE, max_new_tokens=3, logits_processor=[5])


def test_calls_without_host_work_keep_the_fast_path(ours):
    """Nothing runs on the host unless asked: no Host, so generate() keeps its captured, rarely-looked-at steps."""
    assert resolve(ours, None, dict(max_new_tokens=4, logits_processor=None, stopping_criteria=None, streamer=None),
                   batch=2).host is None
    assert resolve(ours, None, dict(max_new_tokens=4, max_time=1.0), batch=2).host.stops


# ------------------------------------------------------------------------------------------------
# encoder_outputs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3), dict(do_sample=True, seed=12)])
def test_encoder_outputs_skip_the_encoder_and_give_transformers_tokens(hf, ours, kw):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 0, 0, 0, 0], [15, 16, 17, 18, 19, 0, 0]])
    mask = (ids != 0).long()
    kw = dict(kw, max_new_tokens=10)
    seed = kw.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    want = hf.generate(ids, attention_mask=mask, **kw)
    theirs = hf.get_encoder()(input_ids=ids, attention_mask=mask)  # the transformers idiom
    hidden, _ = ours.encode(ids, mask)
    for enc in (theirs, BaseModelOutput(last_hidden_state=hidden), (hidden,)):
        if seed is not None:
            torch.manual_seed(seed)
        got = ours.generate(encoder_outputs=enc, attention_mask=mask, **kw)
        assert_same_tokens(want, got, kw)
    padded = hidden.clone()
    padded[mask == 0] = 1e4  # padding positions of the given states are ignored
    if seed is not None:
        torch.manual_seed(seed)
    assert_same_tokens(want, ours.generate(ids, encoder_outputs=(padded,), attention_mask=mask, **kw))


def test_encoder_outputs_errors(ours):
    with pytest.raises(InvalidInputError, match="input_ids has batch 1 but encoder_outputs 2"):
        ours.generate(ONE, encoder_outputs=(torch.zeros(2, 3, 32),), max_new_tokens=3)
    with pytest.raises(InvalidInputError, match="encoder_outputs must be"):
        ours.generate(encoder_outputs=(torch.zeros(2, 3, 7),), max_new_tokens=3)
    with pytest.raises(InvalidInputError, match="attention_mask has shape"):
        ours.generate(encoder_outputs=(torch.zeros(2, 3, 32),), attention_mask=torch.ones(2, 4), max_new_tokens=3)
