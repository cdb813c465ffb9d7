"""Training data for the VQ-VAE: the chains of one split of a structure folder's index.jsonl,
random crops and padded batches (reproducible per step, so a resumed run sees the same data)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from esm3_jax.data.sources import STRUCTURE_SUFFIXES, structure_files
from esm3_jax.model.vqvae import N_AMINO_ACIDS, aa_indices
from esm3_jax.structure.io import iter_chains, load_structure

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


# A chain needs this many residues with N, CA and C to be trained on and scored (superposition
# needs three points); the shared index already leaves out chains under 30.
MIN_BACKBONE_RESIDUES = 3


def _chain_record(name: str, c, all_atom: bool) -> Chain:
    return Chain(name, np.array(c.backbone), np.array(c.residue_index), aa_indices(c.sequence),
                 np.array(c.coords) if all_atom else None)


def _enough_backbone(c) -> bool:
    return int(np.isfinite(np.asarray(c.backbone)).all((-1, -2)).sum()) >= MIN_BACKBONE_RESIDUES


def load_split(data_dir: Path, split: str, max_chains: int = 0, all_atom: bool = False, max_length: int = 0) -> list[Chain]:
    """The chains of one split of a structure folder (each file parsed once); with all_atom, every
    heavy atom too (atom37), not only the backbone. max_length > 0 leaves out longer chains (they
    are not cropped); max_chains > 0 keeps the first that many after that.

    A folder with an index.jsonl (the shared structures' format: file, chain, n_res, split) gives
    the rows of that split. Any other folder is read as it is: every usable protein chain of every
    PDB/mmCIF file under it (recursive, sorted by path), all of them in the train split; such a
    folder has no valid split.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such structure folder (set train.data_dir or --data)")
    index = data_dir / "index.jsonl"
    if not index.is_file():
        return _load_folder(data_dir, split, max_chains, all_atom, max_length)
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == split and (not max_length or r["n_res"] <= max_length)]
    if max_chains:
        rows = rows[:max_chains]
    by_file: dict[str, list[str]] = {}
    for r in rows:
        by_file.setdefault(r["file"], []).append(r["chain"])
    chains = []
    for file, wanted in by_file.items():
        found = {c.chain_id: c for c in load_structure(data_dir / file)}
        chains.extend(_chain_record(f"{file}/{chain_id}", found[chain_id], all_atom) for chain_id in wanted)
    if not chains:
        raise ValueError(f"{index}: no chains in split '{split}'" + (f" of at most {max_length} residues" if max_length else ""))
    return chains


def _load_folder(data_dir: Path, split: str, max_chains: int, all_atom: bool, max_length: int) -> list[Chain]:
    if split != "train":
        raise ValueError(f"{data_dir}: no index.jsonl, so no '{split}' split: every chain in the folder is a training "
                         "chain (evaluate them with train.eval_split=train)")
    files = structure_files(data_dir)
    if not files:
        raise ValueError(f"{data_dir}: no PDB/mmCIF files ({', '.join(STRUCTURE_SUFFIXES)}, optionally .gz) and no index.jsonl")
    chains = []
    for file in files:
        for c in iter_chains([file], max_length=max_length or None):  # unusable chains are skipped
            if _enough_backbone(c):
                chains.append(_chain_record(f"{file.relative_to(data_dir)}/{c.chain_id}", c, all_atom))
        if max_chains and len(chains) >= max_chains:
            chains = chains[:max_chains]
            break
    if not chains:
        raise ValueError(f"{data_dir}: none of its {len(files)} structure files has a usable protein chain"
                         + (f" of at most {max_length} residues" if max_length else ""))
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
    """Endless random crops; batch i depends only on (seed, i), so a resumed run sees the same data.
    A batch holds distinct chains when there are enough of them (with as many chains as rows,
    every batch holds every chain once)."""
    step = start_step
    while True:
        rng = np.random.default_rng([seed, step])
        picks = rng.choice(len(chains), batch_size, replace=batch_size > len(chains))
        yield pad_chains([crop(chains[i], length, rng) for i in picks], length)
        step += 1
