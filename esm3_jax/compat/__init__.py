"""Interoperability with the reference PyTorch ESM3: weight tables, `convert`, params checkpoints
on disk, and the reference model built for side-by-side tests and benchmarks."""
