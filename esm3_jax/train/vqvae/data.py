"""Training data for the VQ-VAE: the chains of one split of a structure folder's index.jsonl,
random crops and padded batches (reproducible per step, so a resumed run sees the same data)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from esm3_jax.model.vqvae import N_AMINO_ACIDS, aa_indices
from esm3_jax.structure.io import load_structure

# The real structures are shared by all checkouts, so they live beside this one, not in it:
# <repo>/../shared/data/structures. It is the data folder when train.data_dir is '' (as in
# configs/vqvae_*.yaml), and the tests read the same folder.
_REPO_ROOT = Path(__file__).resolve().parents[3]
SHARED_STRUCTURES_DIR = _REPO_ROOT.parent / "shared" / "data" / "structures"


@dataclasses.dataclass(frozen=True)
class Chain:
    name: str  # file/chain
    backbone: np.ndarray  # (L, 3, 3) N, CA, C; NaN where missing
    residue_index: np.ndarray  # (L,)
    aa: np.ndarray  # (L,) indices into AMINO_ACIDS, 20 = other
    atom37: np.ndarray | None = None  # (L, 37, 3), NaN where missing; kept for all-atom decoders


def load_split(data_dir: Path, split: str, max_chains: int = 0, all_atom: bool = False) -> list[Chain]:
    """The chains of one split of index.jsonl (each file parsed once); with all_atom, every
    heavy atom too (atom37), not only the backbone."""
    index = data_dir / "index.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"{index}: no structure index (set train.data_dir)")
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == split]
    if max_chains:
        rows = rows[:max_chains]
    by_file: dict[str, list[str]] = {}
    for r in rows:
        by_file.setdefault(r["file"], []).append(r["chain"])
    chains = []
    for file, wanted in by_file.items():
        found = {c.chain_id: c for c in load_structure(data_dir / file)}
        for chain_id in wanted:
            c = found[chain_id]
            chains.append(Chain(f"{file}/{chain_id}", np.array(c.backbone), np.array(c.residue_index), aa_indices(c.sequence),
                                np.array(c.coords) if all_atom else None))
    if not chains:
        raise ValueError(f"{index}: no chains in split '{split}'")
    return chains


def pad_chains(chains: list[Chain], length: int) -> dict[str, np.ndarray]:
    """Stack chains (each at most `length`) into a padded batch; padding has NaN coordinates."""
    B = len(chains)
    batch = {
        "coords": np.full((B, length, 3, 3), np.nan, np.float32),
        "residue_index": np.zeros((B, length), np.int32),
        "aa": np.full((B, length), N_AMINO_ACIDS, np.int32),
        "valid": np.zeros((B, length), bool),
    }
    if chains[0].atom37 is not None:
        batch["atom37"] = np.full((B, length, 37, 3), np.nan, np.float32)
    for b, c in enumerate(chains):
        n = len(c.aa)
        if c.atom37 is not None:
            batch["atom37"][b, :n] = c.atom37
        batch["coords"][b, :n] = c.backbone
        batch["residue_index"][b, :n] = c.residue_index
        batch["aa"][b, :n] = c.aa
        batch["valid"][b, :n] = True
    return batch


def crop(chain: Chain, length: int, rng: np.random.Generator) -> Chain:
    n = len(chain.aa)
    if n <= length:
        return chain
    s = int(rng.integers(0, n - length + 1))
    atom37 = None if chain.atom37 is None else chain.atom37[s:s + length]
    return Chain(chain.name, chain.backbone[s:s + length], chain.residue_index[s:s + length], chain.aa[s:s + length], atom37)


def batches(chains: list[Chain], batch_size: int, length: int, seed: int, start_step: int = 0) -> Iterator[dict]:
    """Endless random crops; batch i depends only on (seed, i), so a resumed run sees the same data."""
    step = start_step
    while True:
        rng = np.random.default_rng([seed, step])
        picks = rng.integers(0, len(chains), batch_size)
        yield pad_chains([crop(chains[i], length, rng) for i in picks], length)
        step += 1
