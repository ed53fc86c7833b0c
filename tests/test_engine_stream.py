"""Engine streaming: a stream's chunks concatenate to the non-streamed result, which equals
model.generate on the input alone (greedy, processors, sampling, several sequences, beam search);
the async iterator gives the same; closing a stream (close(), with, dropping it after a break) or
cancelling a future cancels the request and frees its decode slot at once; errors surface. Stop
strings (stop=) end a request, streamed or not, where model.generate(stop_strings=..., tokenizer=...)
on it alone ends, however often the engine looks."""

import asyncio
import gc
import shutil
import time

import pytest
import torch
import transformers as T
from conftest import solo

import encdec_fast
from encdec_fast import EngineClosedError, InvalidInputError, RequestCancelledError

pytestmark = pytest.mark.usefixtures("quiet", "one_torch_thread")


@pytest.fixture(scope="module")
def model(make_ckpt):
    return encdec_fast.load(make_ckpt("bert", "gpt2"), device="cpu")


def joined(start, chunks, several):
    """[start] + the chunks concatenated, per sequence."""
    if not several:
        return [start] + [t for c in chunks for t in c]
    rows = [[start] for _ in chunks[0]]
    for c in chunks:
        for row, new in zip(rows, c):
            row += new
    return rows


CASES = [
    dict(max_new_tokens=12),
    dict(max_new_tokens=10, eos_token_id=None, no_repeat_ngram_size=2, repetition_penalty=1.3),
    dict(max_new_tokens=9, do_sample=True, top_k=20, seed=5),
    dict(max_new_tokens=7, do_sample=True, num_return_sequences=3, top_p=0.9, seed=6),
    dict(max_new_tokens=8, num_beams=3),
    dict(max_new_tokens=6, num_beams=2, num_return_sequences=2),
]


def test_stream_chunks_concatenate_to_the_result_and_to_model_generate(model):
    inputs = [[5, 6, 7, 8, 9], [40, 41, 42], [11] * 17, [60, 61], [70, 71, 72, 73], [80]]
    start = model.generation_config.decoder_start_token_id
    with encdec_fast.Engine(model, max_batch_size=8) as engine:
        streams = [engine.stream(x, **kw) for x, kw in zip(inputs, CASES)]  # all in the engine at once
        chunks = [list(s) for s in streams]
        results = [s.result() for s in streams]
    for x, kw, ch, res in zip(inputs, CASES, chunks, results):
        several = kw.get("num_return_sequences", 1) > 1
        want = solo(model, x, **kw)
        assert res.output_ids == (want if several else want[0]), kw
        assert joined(start, ch, several) == res.output_ids, kw
        if kw.get("num_beams", 1) > 1:
            assert len(ch) == 1, "beam search streams its tokens as one chunk when it finishes"
        else:
            assert len(ch) == len(want[0]) - 1, "one chunk per decode step"


def test_async_streams_match_model_generate(model):
    inputs = [[5, 6, 7], [8, 9, 10, 11, 12], [13], [14, 15]]

    async def consume(engine, x):
        stream = engine.astream(x, max_new_tokens=10, eos_token_id=None)
        chunks = [c async for c in stream]
        return chunks, await stream.aresult()

    async def main(engine):
        return await asyncio.gather(*(consume(engine, x) for x in inputs))

    with encdec_fast.Engine(model, max_batch_size=4) as engine:
        out = asyncio.run(main(engine))
    start = model.generation_config.decoder_start_token_id
    for x, (chunks, res) in zip(inputs, out):
        assert [res.output_ids] == solo(model, x, max_new_tokens=10, eos_token_id=None)
        assert joined(start, chunks, False) == res.output_ids and len(chunks) == 10


def test_text_inputs_stream_tokens_whose_text_is_the_results(make_ckpt, tmp_path):
    import transformers as T

    path = tmp_path / "with_tok"
    shutil.copytree(make_ckpt("bert", "gpt2"), path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(92)]
    T.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    model = encdec_fast.load(path, device="cpu")
    with encdec_fast.Engine(model) as engine:
        stream = engine.stream("w1 w2 w3", max_new_tokens=8, eos_token_id=None)
        tokens = [t for c in stream for t in c]
        res = stream.result()
        assert engine.detokenize(res.output_ids) == res.text
        assert engine.detokenize(tokens) == res.text and isinstance(res.text, str)


def wait_for(cond, timeout=30):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.01)


def test_closing_a_running_stream_frees_its_slot(model):
    """One decode slot: a long stream holds it; closing the stream lets the next request run at once."""
    with encdec_fast.Engine(model, max_batch_size=1) as engine:
        long = engine.stream([5, 6, 7], max_new_tokens=100, eos_token_id=None)
        first = next(long)
        waiting = engine.submit([8, 9], max_new_tokens=3, eos_token_id=None)
        assert engine.stats.requests_waiting == 1 and not waiting.done()
        assert long.close() is True
        assert [waiting.result(timeout=60).output_ids] == solo(model, [8, 9], max_new_tokens=3, eos_token_id=None)
        rest = list(long)  # what was streamed before the pool dropped it, then the end
        with pytest.raises(RequestCancelledError, match="cancelled"):
            long.result()
        stats = engine.stats
    assert len(first) == 1 and len(rest) < 99
    assert stats.decode_steps < 100, "the closed stream ran to its budget"
    assert stats.requests_cancelled == 1 and stats.requests_completed == 1 and stats.requests_failed == 0
    assert long.close() is False  # already over


def test_breaking_out_of_for_and_async_for_cancels(model):
    async def async_break(engine):
        async for _ in engine.astream([5, 6], max_new_tokens=100, eos_token_id=None):
            break

    with encdec_fast.Engine(model, max_batch_size=1) as engine:
        for _ in engine.stream([5, 6], max_new_tokens=100, eos_token_id=None):
            break
        gc.collect()
        wait_for(lambda: engine.stats.requests_cancelled == 1)
        asyncio.run(async_break(engine))
        gc.collect()
        wait_for(lambda: engine.stats.requests_cancelled == 2)
        res = engine.submit([8, 9], max_new_tokens=3).result(timeout=60)
        wait_for(lambda: engine.stats.requests_running == 0)
        stats = engine.stats
    assert [res.output_ids] == solo(model, [8, 9], max_new_tokens=3)
    assert stats.decode_steps < 100


def test_cancelling_waiting_and_running_requests(model):
    with encdec_fast.Engine(model, max_batch_size=1) as engine:
        running = engine.submit([5, 6, 7], max_new_tokens=100, eos_token_id=None)
        wait_for(lambda: engine.stats.requests_running == 1)
        with engine.stream([8, 9], max_new_tokens=5) as queued:  # leaving the block closes it
            assert not queued.future.done()
        assert queued.future.cancelled() and list(queued) == []
        with pytest.raises(RequestCancelledError):
            queued.result()
        assert running.cancel() is True
        assert isinstance(running.exception(), RequestCancelledError)
        after = engine.submit([10, 11], max_new_tokens=4)
        assert after.result(timeout=60) and running.cancel() is True and queued.future.cancel() is True  # idempotent
        assert after.cancel() is False  # finished
        stats = engine.stats
    assert [after.result().output_ids] == solo(model, [10, 11], max_new_tokens=4)
    assert stats.requests_cancelled == 2 and stats.decode_steps < 100


def test_stream_errors_surface(model):
    engine = encdec_fast.Engine(model, max_batch_size=2)
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        engine.stream([5, 500])
    with pytest.raises(encdec_fast.UnsupportedArgumentError, match="typical_p"):
        engine.stream([5, 6], typical_p=0.5)
    stream = engine.stream([5, 6], max_new_tokens=100, eos_token_id=None)
    next(stream)
    engine.close()
    with pytest.raises(EngineClosedError):
        for _ in stream:
            pass
    with pytest.raises(EngineClosedError):
        engine.stream([5, 6])
    with encdec_fast.Engine(model, max_input_tokens=3) as short:
        with pytest.raises(InvalidInputError, match="max_input_tokens=3"):
            short.stream([5, 6, 7, 8])
        assert short.submit([5, 6, 7], max_new_tokens=2).result().output_ids == solo(model, [5, 6, 7], max_new_tokens=2)[0]


# a WordPiece vocabulary of the checkpoint's 97 ids ("abcdef": StopStringCriteria decodes tokens after it)
STOP_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(91)] + ["abcdef"]

STOP_CASES = [  # (input, arguments): ids 26 = w21, 84 = w79, 21 = w16
    ([5, 6, 7, 8, 9], dict(max_new_tokens=12, stop=["w79"])),
    ([11, 12, 13, 14, 15], dict(max_new_tokens=12, stop="w21")),
    ([20, 21, 22, 23, 24], dict(max_new_tokens=12, stop=["w16 w21"], eos_token_id=None)),  # across tokens
    ([20, 21, 22, 23, 24], dict(max_new_tokens=12, stop=["w21", "w30"], do_sample=True, num_return_sequences=2,
                                seed=3)),  # the finished sequence is padded
    ([20, 21, 22, 23, 24], dict(max_new_tokens=12, stop=["w21", "w30"], do_sample=True, num_return_sequences=2,
                                seed=3, eos_token_id=None)),  # no eos: the finished sequence goes on
    ([30, 31, 32], dict(max_new_tokens=12, stop=["w21"], do_sample=True, top_k=30, seed=4)),
    ([5, 6, 7, 8, 9], dict(max_new_tokens=6)),  # no stop strings beside the others
]


def _generated(row: list[int], stop, tok, kw) -> int:
    """Tokens generated in one of model.generate's rows: up to its eos (2 unless eos_token_id=None), else up to
    the token that completes a stop string (the padding after it left out), else all of them."""
    eos = () if "eos_token_id" in kw else (2,)
    for j in range(1, len(row)):
        if row[j] in eos or (stop and any(s in tok.decode(row[1:j + 1]) for s in ([stop] if isinstance(stop, str)
                                                                                  else stop))):
            return j
    return len(row) - 1


@pytest.mark.parametrize("check_every", [1, 4])
def test_stop_strings_end_requests_where_model_generate_ends(model, check_every):
    tok = T.BertTokenizer(vocab={w: i for i, w in enumerate(STOP_VOCAB)})
    start = model.generation_config.decoder_start_token_id
    with encdec_fast.Engine(model, max_batch_size=8, check_every=check_every, tokenizer=tok) as engine:
        streams = [engine.stream(x, **kw) for x, kw in STOP_CASES]  # all in the engine at once
        futures = [engine.submit(x, **kw) for x, kw in STOP_CASES]
        chunks = [list(s) for s in streams]
        results = [s.result() for s in streams]
        stats = engine.stats
    assert stats.requests_failed == 0
    stopped = 0
    for (x, kw), ch, res, fut in zip(STOP_CASES, chunks, results, futures):
        kw = dict(kw)
        stop = kw.pop("stop", None)
        several = kw.get("num_return_sequences", 1) > 1
        want = solo(model, x, **kw, **(dict(stop_strings=stop, tokenizer=tok) if stop else {}))
        assert res.output_ids == (want if several else want[0]) == fut.result().output_ids, kw
        assert joined(start, ch, several) == res.output_ids, "a chunk ran past the stop"
        assert res.num_generated == sum(_generated(row, stop, tok, kw) for row in want), kw
        if check_every == 1:  # served by the pool's steps, one chunk each (not by a fallback generate())
            assert len(ch) == len(want[0]) - 1, kw
        stopped += stop is not None and len(want[0]) < 13
    assert stopped >= 3, "too few requests stopped at a stop string to test anything"


def test_stop_strings_on_text_inputs_and_their_errors(make_ckpt, tmp_path, model):
    path = tmp_path / "with_tok"
    shutil.copytree(make_ckpt("bert", "gpt2"), path)
    T.BertTokenizer(vocab={w: i for i, w in enumerate(STOP_VOCAB)}).save_pretrained(path)
    with_tok = encdec_fast.load(path, device="cpu")
    with encdec_fast.Engine(with_tok) as engine:  # the folder's tokenizer
        res = engine.submit("w0 w1 w2 w3 w4", max_new_tokens=12, stop=["w79"]).result()
        assert res.text.endswith("w79") and len(res.output_ids) < 13
        assert engine.submit("w0 w1 w2 w3 w4", max_new_tokens=12, stop_strings="w79").result() == res
        for kw, err, match in [
            (dict(stop=[""]), InvalidInputError, "stop must be"),
            (dict(stop=["w1"], stop_strings=["w2"]), InvalidInputError, "not both"),
            (dict(stop=["w1"], num_beams=2), encdec_fast.UnsupportedArgumentError, "beam search"),
            (dict(max_time=1.0), encdec_fast.UnsupportedArgumentError, "max_time"),
            (dict(streamer=object()), encdec_fast.UnsupportedArgumentError, "streamer"),
            (dict(stopping_criteria=[]), encdec_fast.UnsupportedArgumentError, "stopping_criteria"),
        ]:
            with pytest.raises(err, match=match):
                engine.stream([5, 6], max_new_tokens=3, **kw)
    with encdec_fast.Engine(model) as engine:  # no tokenizer anywhere
        with pytest.raises(InvalidInputError, match="stop strings need a tokenizer"):
            engine.stream([5, 6], max_new_tokens=3, stop=["w1"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the decode pool's CUDA-graph step")
def test_streams_on_cuda_match_model_generate(make_ckpt):
    """On a GPU (triton backend, the pool's captured step): streams, a cancel mid-stream, and solo generate."""
    model = encdec_fast.load(make_ckpt("bert", "gpt2"), device="cuda", backend="triton")
    inputs = [[5, 6, 7, 8], [9, 10], [11] * 30]
    start = model.generation_config.decoder_start_token_id
    with encdec_fast.Engine(model, max_batch_size=4) as engine:
        streams = [engine.stream(x, max_new_tokens=20, eos_token_id=None) for x in inputs]
        dropped = engine.stream([12, 13], max_new_tokens=100, eos_token_id=None)
        next(dropped)
        dropped.close()
        for x, s in zip(inputs, streams):
            chunks = list(s)
            assert joined(start, chunks, False) == s.result().output_ids == solo(model, x, max_new_tokens=20,
                                                                                  eos_token_id=None)[0]
        assert engine.stats.requests_cancelled == 1
