"""esm3-jax: ESM3, the multimodal protein language model, in JAX/Flax, built for pretraining at scale."""

__version__ = "0.1.0"
