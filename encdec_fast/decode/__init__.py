"""One token's life: params (a request's settings, resolved once), state (the decode buffers), step (one step,
from the state and a frozen plan), runner (captured or eager), ops / select / beam (the decode ops, logits
processors and beam search on the device), search (generate()'s loop)."""
