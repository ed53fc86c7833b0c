"""One token's life: state (KV cache, CUDA-graph steps), select (logits processors and token choice),
search (the greedy / sampling / beam-search loops behind generate())."""
