"""forward() and the encoder under torch.no_grad (what the model does: ordinary tensors out) against
torch.inference_mode with a clone of what is returned (the other way to return ordinary tensors), in one
process, calls alternating, medians compared. generate() runs under no_grad either way (decode/search.py);
what changes there is its encoder call (encode_packed), measured inside whole generate() calls.

    PYTHONPATH=. python benchmarks/grad_mode.py [--rounds 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    import warnings

    warnings.simplefilter("ignore")
    from conftest import build_checkpoint

    import encdec_fast
    from encdec_fast.model import EncDecModel

    tmp = tempfile.TemporaryDirectory()  # removed when the script ends
    path = build_checkpoint(tmp.name, "bert", "gpt2", enc_hidden=256, layers=4, heads=4, vocab=8000,
                            std=0.05)
    model = encdec_fast.load(path, device="cpu")
    g = torch.Generator().manual_seed(0)
    B, S, T = 4, 64, 32
    ids, dec = torch.randint(5, 8000, (B, S), generator=g), torch.randint(5, 8000, (B, T), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1:, S - 20:] = 0

    forward_inference = torch.inference_mode()(EncDecModel.forward.__wrapped__)
    encode_inference = torch.inference_mode()(EncDecModel.encode_packed.__wrapped__)

    def fwd_no_grad():
        return model(ids, attention_mask=mask, decoder_input_ids=dec).logits

    def fwd_inference_clone():
        out = forward_inference(model, ids, attention_mask=mask, decoder_input_ids=dec)
        out.encoder_last_hidden_state.clone()
        return out.logits.clone()

    def gen(inference: bool):
        def run():
            if inference:
                model.encode_packed = types.MethodType(encode_inference, model)
            try:
                return model.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16)
            finally:
                if inference:
                    del model.encode_packed
        return run

    pairs = {"forward (B4 S64 T32)": (fwd_no_grad, fwd_inference_clone),
             "generate 16 tokens (B4 S64)": (gen(False), gen(True))}
    assert torch.equal(fwd_no_grad(), fwd_inference_clone()) and torch.equal(gen(False)(), gen(True)())
    print(f"{model!r}, torch {torch.__version__}, {a.threads} threads, {a.rounds} alternating rounds")
    for name, (no_grad, inference) in pairs.items():
        times = {"no_grad": [], "inference_mode+clone": []}
        for _ in range(3):  # warm-up
            no_grad(), inference()
        for r in range(a.rounds):
            order = [("no_grad", no_grad), ("inference_mode+clone", inference)]
            for label, fn in (order if r % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        paired = statistics.median(x / y for x, y in zip(times["no_grad"], times["inference_mode+clone"]))
        print(f"{name}: no_grad {med['no_grad']:.2f} ms, inference_mode+clone {med['inference_mode+clone']:.2f} ms "
              f"(medians); no_grad / inference_mode: {med['no_grad'] / med['inference_mode+clone']:.3f} of the "
              f"medians, {paired:.3f} median of the rounds' ratios")


if __name__ == "__main__":
    main()
