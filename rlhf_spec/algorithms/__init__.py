"""Algorithms: losses (one module per family, each loss with its paper and equation), logprobs and
batching, the training loop, and online rollouts."""
