"""`esm3-jax bench vqvae-handedness`: which structure-loss mixes fold a chain as its mirror image.

Plain gradient descent (Adam) on backbone coordinates from random-walk starts (what an untrained
decoder emits), against one real chain, for several mixes of the stage-1 losses; frames come from
the moving atoms, exactly as the decoder's do. Prints, per mix, the mean RMSD to the truth and how
many starts end closer to the truth's mirror image. No network: it isolates what the losses
themselves pull toward (BENCHMARKS.md, issue 20).
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from esm3_jax.model.frames import backbone_frames
from esm3_jax.structure import geometry
from esm3_jax.structure.io import load_chain
from esm3_jax.train.vqvae import loss as VL
from esm3_jax.train.vqvae.data import SHARED_STRUCTURES_DIR

# name -> (distance weight, direction weight, FAPE weight, FAPE clamp in Å)
MIXES = {
    "distance": (1.0, 0.0, 0.0, 10.0),
    "distance+direction": (1.0, 1.0, 0.0, 10.0),
    "distance+direction+fape": (1.0, 1.0, 1.0, 10.0),
    "distance+direction+fape_unclamped": (1.0, 1.0, 1.0, 1e6),
    "distance+direction+30fape": (1.0, 1.0, 30.0, 10.0),
    "distance+direction+30fape_unclamped": (1.0, 1.0, 30.0, 1e6),
    "direction+fape_unclamped": (0.0, 1.0, 1.0, 1e6),
    "fape": (0.0, 0.0, 1.0, 10.0),
    "fape_unclamped": (0.0, 0.0, 1.0, 1e6),
}
DEFAULT_CHAIN = "mdanalysis_mmcif/5PTI.cif.gz:A"


def bench_vqvae_handedness(chain: str = DEFAULT_CHAIN, mixes=tuple(MIXES), starts: int = 8, steps: int = 400,
                           learning_rate: float = 0.1, seed: int = 0) -> dict[str, dict]:
    path, _, chain_id = chain.rpartition(":")
    file = Path(path) if Path(path).is_file() else SHARED_STRUCTURES_DIR / path
    unknown = [m for m in mixes if m not in MIXES]
    if unknown:
        raise ValueError(f"unknown loss mix {unknown[0]!r}; choose from {', '.join(MIXES)}")
    c = load_chain(file, chain_id)
    true = jnp.asarray(c.backbone[None], jnp.float32)
    mask = jnp.isfinite(true).all((-1, -2))
    truth = np.asarray(c.backbone).reshape(-1, 3)
    rng = np.random.default_rng(seed)
    x0 = jnp.asarray(np.cumsum(rng.normal(size=(starts, *true.shape[1:])) * 0.9, axis=1), jnp.float32)
    tx = optax.adam(learning_rate)
    print(f"{c.sequence[:10]}... ({file.name}:{chain_id}, {true.shape[1]} residues), {starts} random-walk starts, "
          f"{steps} Adam steps at {learning_rate}")
    results = {}
    for name in mixes:
        w_dist, w_dir, w_fape, clamp = MIXES[name]

        def loss(x):
            x = x[None]
            rot, trans, _ = backbone_frames(x)
            return (w_dist * VL.backbone_distance_loss(x, true, mask, 1e6) + w_dir * VL.backbone_direction_loss(x, true, mask)
                    + w_fape * VL.backbone_fape_loss(rot, trans, x, true, mask, clamp))

        def descend(x):
            def step(carry, _):
                x, opt = carry
                upd, opt = tx.update(jax.grad(loss)(x), opt)
                return (optax.apply_updates(x, upd), opt), None

            return jax.lax.scan(step, (x, tx.init(x)), None, length=steps)[0][0]

        t0 = time.perf_counter()
        ends = np.asarray(jax.jit(jax.vmap(descend))(x0))
        to_truth = np.array([geometry.rmsd(e.reshape(-1, 3), truth) for e in ends])
        to_mirror = np.array([geometry.rmsd(e.reshape(-1, 3), geometry.mirror_image(truth)) for e in ends])
        n_mirror = int((to_mirror < to_truth).sum())
        results[name] = {"rmsd_mean": float(to_truth.mean()), "mirror_closer": n_mirror}
        print(f"{name:38s} RMSD mean {to_truth.mean():5.2f} Å   closer to the mirror {n_mirror}/{starts}   "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return results
