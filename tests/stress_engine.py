"""The engine stress run, in a process of its own (tests/test_engine_stress.py runs it):

    python tests/stress_engine.py CHECKPOINT [N_REQUESTS] [N_THREADS]

N requests (default 2000) from N_THREADS threads (default 16) on one Engine, 5% of them bad, in each
way a request can be bad: arguments that would break a whole batch if they reached it (out-of-vocabulary or negative
special ids, float lengths, num_beams=0, a string length penalty), bad token ids, an unsupported option,
and failures inside a batch (tests/poison.py: an encoder micro-batch that raises, NaN logits in greedy
and beam-search rows of the pool and in a beam-sampling run). Checks that every good request equals model.generate on it
alone, that
every bad one fails alone with its expected error, and that nothing hangs; then ends WITHOUT
engine.close(): the caller checks the exit code is 0. Prints "STRESS OK ..." on success.
"""

import concurrent.futures as cf
import random
import sys
import threading
import time
import warnings

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from poison import NAN, RAISE, poison  # noqa: E402

import encdec_fast  # noqa: E402
from encdec_fast import InvalidInputError, NumericalError, UnsupportedArgumentError  # noqa: E402

warnings.simplefilter("ignore")

GOOD = [  # generation arguments of the good requests (short generations: CI has 2 cores)
    dict(max_new_tokens=2),
    dict(max_new_tokens=4, eos_token_id=None),
    dict(max_new_tokens=3, repetition_penalty=1.3, no_repeat_ngram_size=2),
    dict(max_new_tokens=3, do_sample=True, top_k=10, seed=7),
    dict(max_new_tokens=3, do_sample=True, num_return_sequences=2, seed=11),
    dict(max_new_tokens=3, num_beams=2),
    dict(max_new_tokens=3, num_beams=2, do_sample=True, seed=5),
]
BAD = [  # (source, arguments, expected error class, words in its message)
    (None, dict(decoder_start_token_id=200), InvalidInputError, "decoder_start_token_id=200"),
    (None, dict(pad_token_id=200), InvalidInputError, "pad_token_id=200"),
    (None, dict(max_new_tokens=6.5), InvalidInputError, "max_new_tokens must be an int"),
    (None, dict(decoder_start_token_id=-1), InvalidInputError, "decoder_start_token_id=-1"),
    (None, dict(pad_token_id=-1), InvalidInputError, "pad_token_id=-1"),
    (None, dict(num_beams=0), InvalidInputError, "num_beams must be an int"),
    (None, dict(num_beams=2, length_penalty="x"), InvalidInputError, "length_penalty"),
    ([5, 500, 6], dict(), InvalidInputError, "outside the vocabulary"),
    ([], dict(), InvalidInputError, "empty"),
    (None, dict(typical_p=0.5), UnsupportedArgumentError, "typical_p"),
    ([5, RAISE, 6], dict(), RuntimeError, "poisoned source"),  # fails its encoder micro-batch
    (None, dict(decoder_start_token_id=NAN), NumericalError, "NaN or inf logits"),  # NaN row in the pool
    (None, dict(decoder_start_token_id=NAN, num_beams=2), NumericalError, "NaN or inf logits"),  # beam rows
    (None, dict(decoder_start_token_id=NAN, num_beams=2, do_sample=True, seed=3), NumericalError, "NaN or inf"),
]


def main(path, n=2000, threads=16):
    # the tiny model gains nothing from intra-op threads, and on a busy 2-core machine OpenMP's waits for
    # descheduled threads made each op 10-20x slower (measured): one thread keeps the run short
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = poison(encdec_fast.load(path, device="cpu"))
    rng = random.Random(0)
    sources = [[rng.randrange(4, 90) for _ in range(rng.randrange(1, 24))] for _ in range(40)]
    plan = []  # (source, kwargs, expected error or None)
    for i in range(n):
        if i % 20 == 0:  # 5% bad, each way in turn
            src, kw, err, words = BAD[(i // 20) % len(BAD)]
            plan.append((src if src is not None else rng.choice(sources), {"max_new_tokens": 3, **kw}, (err, words)))
        else:
            plan.append((rng.choice(sources), dict(rng.choice(GOOD)), None))
    futures = [None] * n
    engine = encdec_fast.Engine(model, max_batch_size=16)  # never closed: the interpreter's exit must be clean

    def client(k):
        for i in range(k, n, threads):
            futures[i] = engine.submit(plan[i][0], **plan[i][1])

    workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done, pending = cf.wait(futures, timeout=600)
    assert not pending, f"{len(pending)} requests never settled"
    t_engine = time.perf_counter() - t0

    memo, n_bad = {}, 0
    for i, ((src, kw, bad), fut) in enumerate(zip(plan, futures)):
        exc = fut.exception()
        if bad is not None:
            n_bad += 1
            assert isinstance(exc, bad[0]) and bad[1] in str(exc), (i, kw, repr(exc))
            assert isinstance(exc, encdec_fast.EncDecError) or "poisoned" in str(exc), repr(exc)
            continue
        assert exc is None, (i, kw, repr(exc))
        key = (tuple(src), repr(sorted(kw.items())))
        if key not in memo:
            k = dict(kw)
            seed = k.pop("seed", None)
            if seed is not None:
                torch.manual_seed(seed)
            rows = model.generate(torch.tensor([src]), **k).tolist()
            memo[key] = rows[0] if len(rows) == 1 else rows
        assert fut.result().output_ids == memo[key], (i, kw, fut.result().output_ids, memo[key])
    s = engine.stats
    assert s.requests_submitted == n and s.requests_failed == n_bad and s.requests_completed == n - n_bad, s
    print(f"STRESS OK {n} requests ({n_bad} bad) from {threads} threads: engine {t_engine:.1f} s, "
          f"checked against {len(memo)} solo runs in {time.perf_counter() - t0 - t_engine:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
