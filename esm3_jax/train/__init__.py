"""Pretraining ESM3: config, setup, state, step, loss, optimizer, sharding, checkpoints, evaluation,
the loop and ahead-of-time compilation."""
