"""Requests that fail inside a batch, on purpose, for the failure-isolation tests (engine and stress).

poison(model) wraps the model's encoder and decoder step so that:
  - a source holding RAISE makes the encoder raise (a whole encoder micro-batch fails);
  - a row fed STEP_RAISE at decoder position 0 (decoder_start_token_id=STEP_RAISE) makes the decode step
    raise (a whole decode step fails);
  - a row fed NAN at decoder position 0 gets NaN logits (as float16 overflow gives), the others are untouched.
Good requests never hold these tokens at those places, so their outputs are the model's own.
"""


RAISE, STEP_RAISE, NAN = 94, 95, 96


def poison(model, setattr=setattr):
    """setattr: pytest's monkeypatch.setattr to have the wrappers removed after the test."""
    enc_forward, dec_step = model.net.encoder.forward, model.net.decoder.step

    def encoder(ids, *a, **k):
        if bool((ids == RAISE).any()):
            raise RuntimeError("poisoned source")
        return enc_forward(ids, *a, **k)

    def step(seq, t, *a, **k):  # row n feeds seq[n, t[n] - 1] at position t[n] - 1
        ids = seq.gather(1, (t - 1)[:, None]).squeeze(1)
        first = t == 1
        if bool(((ids == STEP_RAISE) & first).any()):
            raise RuntimeError("poisoned decode step")
        logits = dec_step(seq, t, *a, **k)
        return logits.masked_fill(((ids == NAN) & first)[:, None], float("nan"))

    setattr(model.net.encoder, "forward", encoder)
    setattr(model.net.decoder, "step", step)
    return model
