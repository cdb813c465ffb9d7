"""Training the VQ-VAE structure tokenizer (`esm3-jax train-vqvae`): config, data, losses,
the two stages, evaluation and the run loop."""
