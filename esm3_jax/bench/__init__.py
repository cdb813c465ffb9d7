"""`esm3-jax bench`: speed measured side by side with the reference and the machine's matmul peak."""
