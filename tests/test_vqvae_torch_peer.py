"""The PyTorch peer of the VQ-VAE stage-1 step (bench/vqvae_torch_peer.py): from the same weights,
codebook and real crops (padding and a residue without coordinates included), one step of the
JAX trainer and one of the torch loop over the reference encoder and decoder give the same loss
terms, the same gradient norm, the same AdamW updates and the same codebook after the EMA step,
so that `bench vqvae-step --against-torch` times the same computation on both sides."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tests.paths import CONFIGS, STRUCTURES
from tests.reference import import_reference

# The smallest shapes that still run every part: 1 encoder block, 1 decoder block, every ported
# loss on (the distance loss at its default (5 Å)^2 clamp, FAPE at 10 Å).
TINY = ["encoder.d_model=16", "encoder.v_heads=2", "encoder.n_layers=1", "encoder.d_out=8", "encoder.n_codes=32",
        "decoder.d_model=32", "decoder.n_heads=2", "decoder.n_layers=1", "train.batch_size=2", "train.crop_length=40",
        "train.warmup_steps=0", "train.seed=3",
        *(f"train.loss_weights.{k}=1.0" for k in ("distance", "direction", "distogram", "direction_bins",
                                                   "inverse_folding", "fape")), "train.fape_clamp=10.0"]


def test_first_step_agrees_with_the_jax_trainer():
    import_reference()
    if not STRUCTURES.is_dir():
        pytest.skip(f"real structures not found at {STRUCTURES}")
    from esm3_jax.bench import vqvae_step
    from esm3_jax.train.vqvae.config import load_vqvae_config
    from esm3_jax.train.vqvae.data import load_split, pad_chains
    from esm3_jax.train.vqvae.stages import Stage1, _has_structure

    cfg = load_vqvae_config(CONFIGS / "vqvae_small.yaml", TINY)
    chains = load_split(STRUCTURES, "train", 4)
    # One crop shorter than the batch's length (padding), one whole; a residue loses its CA.
    host = pad_chains([dataclasses_replace(chains[0], 30), dataclasses_replace(chains[1], 40)], 40)
    host["coords"][1, 7, 1] = np.nan
    host = _has_structure(host)
    assert host["valid"].sum() == 70 and host["has_structure"].sum() == 69
    xs = [{k: jnp.asarray(v) for k, v in host.items()}]
    # The codebook is fitted to other chains, as the trainer fits it (same_start says why).
    fit = _has_structure(pad_chains([dataclasses_replace(c, 40) for c in chains[2:]], 40))
    trainer = Stage1(cfg)
    state, model = vqvae_step.same_start(trainer, [{k: jnp.asarray(v) for k, v in fit.items()}])
    _, jax_first, _, _, checks = vqvae_step.first_steps(trainer, state, model, [host], xs, ("eager",))
    c = checks["eager"]
    assert set(c["losses"]) == {"distance", "direction", "distogram", "direction_bins", "inverse_folding",
                                "commitment", "fape", "total", "grad_norm"}
    assert all(jax_first[k] > 0 for k in c["losses"])  # every term is live
    assert max(c["relative_differences"].values()) < 2e-6, c["relative_differences"]
    # Adam's first step is about lr * sign(gradient): only a gradient within rounding of zero may differ.
    assert c["update_agreement"] > 0.999 and c["update_max_diff_in_lr"] < 2.5, c
    assert c["codes_agree"] == 1.0 and c["codebook_relative_difference"] < 1e-5, c


def dataclasses_replace(chain, n):
    import dataclasses

    return dataclasses.replace(chain, backbone=chain.backbone[:n], residue_index=chain.residue_index[:n], aa=chain.aa[:n])
