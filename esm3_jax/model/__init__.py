"""Flax modules and their configs: ESM3, its layers and geometric attention, the VQ-VAE. Model code
names logical axes only; train/sharding.py maps them to the mesh."""
