"""Validation of a run's exported encoder/ and decoder/ checkpoints: chains round-tripped
through structure tokens, scored by backbone RMSD, LDDT-CA and codebook usage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from esm3_jax.model.vqvae import AMINO_ACIDS, N_AMINO_ACIDS
from esm3_jax.structure import geometry
from esm3_jax.train.vqvae.config import VQVAEConfig
from esm3_jax.train.vqvae.data import SHARED_STRUCTURES_DIR, Chain, crop, load_split


def evaluate(encoder_dir: Path, decoder_dir: Path, chains: list[Chain], max_length: int) -> dict[str, Any]:
    """Round trip through the exported checkpoints (tokens only): RMSD, LDDT-CA, codebook usage;
    for an all-atom decoder also the means of geometry.all_atom_comparison's heavy-atom metrics.
    `per_chain` lists each chain's numbers."""
    from esm3_jax.inference.structure_tokenizer import StructureTokenizer

    tok = StructureTokenizer.load(encoder_dir, decoder_dir)
    dist = lambda x: np.linalg.norm(x.reshape(-1, 1, 3) - x.reshape(1, -1, 3), axis=-1)  # all atom pairs
    rmsds, mirror_rmsds, drms, lddts, hands, used, all_atom, per_chain = [], [], [], [], [], [], [], []
    for c in chains:
        c = crop(c, max_length, np.random.default_rng(0))
        tokens = tok.tokenize(c.backbone, c.residue_index)
        sequence = "".join(AMINO_ACIDS[i] if i < N_AMINO_ACIDS else "X" for i in c.aa)
        dec = tok.decode(tokens, sequence=sequence)
        if "atom37" in dec and c.atom37 is not None:
            all_atom.append(geometry.all_atom_comparison(dec["atom37"], c.atom37, sequence))
        has = np.isfinite(c.backbone).all((-1, -2))
        pred, true = dec["backbone"][has], c.backbone[has]
        rmsds.append(geometry.rmsd(pred, true))
        # Distances cannot tell a mirror image: how far the decoded fold is from the truth's
        # mirror, and the distance-matrix error (dRMS) that the distance loss sees.
        mirror_rmsds.append(geometry.rmsd(pred, geometry.mirror_image(true)))
        drms.append(float(np.sqrt(np.mean((dist(pred) - dist(true)) ** 2))))
        lddts.append(geometry.lddt_ca(dec["backbone"][:, 1][has], c.backbone[:, 1][has]))
        # Local handedness (helices), apart from the global fold's: CA pseudo-torsions over
        # runs without missing residues (NaN CAs drop the torsions that touch them).
        hands.append(geometry.ca_torsion_sign_agreement(np.where(has[:, None], dec["backbone"][:, 1], np.nan), c.backbone[:, 1]))
        used.append(tokens[tokens >= 0])
        per_chain.append({"name": c.name, "residues": int(has.sum()), "backbone_rmsd": round(rmsds[-1], 3),
                          "mirror_rmsd": round(mirror_rmsds[-1], 3), "lddt_ca": round(lddts[-1], 4)})
    all_codes = np.concatenate(used)
    counts = np.bincount(all_codes, minlength=tok.encoder_config.n_codes)
    p = counts[counts > 0] / counts.sum()
    heavy_atoms = {f"{k}_mean": float(np.nanmean([m[k] for m in all_atom])) for k in (all_atom[0] if all_atom else ())}
    return {
        "chains": len(chains),
        "backbone_rmsd_mean": float(np.mean(rmsds)),
        "backbone_rmsd_median": float(np.median(rmsds)),
        "backbone_rmsd_max": float(np.max(rmsds)),
        "lddt_ca_mean": float(np.mean(lddts)),
        "drms_mean": float(np.mean(drms)),
        "mirror_rmsd_mean": float(np.mean(mirror_rmsds)),
        "mirror_closer_fraction": float(np.mean(np.array(mirror_rmsds) < np.array(rmsds))),
        "ca_torsion_sign_agreement_mean": float(np.nanmean(hands)) if np.isfinite(hands).any() else float("nan"),
        "codes_used": int((counts > 0).sum()),
        "codebook_usage": float((counts > 0).mean()),
        "codebook_perplexity": float(np.exp(-(p * np.log(p)).sum())),
    } | heavy_atoms | {"per_chain": per_chain}


def eval_chains(cfg: VQVAEConfig, split: str) -> list[Chain]:
    """The chains a run is scored on: the first train.max_valid_chains of the split (all if 0; for
    the train split, default the training chains themselves), at most train.max_chain_length long."""
    t = cfg.train
    data_dir = Path(t.data_dir) if t.data_dir else SHARED_STRUCTURES_DIR
    cap = t.max_valid_chains or (t.max_train_chains if split == "train" else 0)
    return load_split(data_dir, split, cap, cfg.decoder.all_atom, t.max_chain_length)


def evaluate_run(cfg: VQVAEConfig, split: str | None = None) -> dict[str, Any]:
    """evaluate() of an output_dir's exported checkpoints on a split (default train.eval_split)."""
    t = cfg.train
    split = split or t.eval_split
    out_dir = Path(t.output_dir)
    enc_dir, dec_dir = out_dir / "encoder", out_dir / "decoder"
    for d in (enc_dir, dec_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no exported checkpoint; train first (train.output_dir={t.output_dir})")
    return evaluate(enc_dir, dec_dir, eval_chains(cfg, split), t.eval_max_length) | {"split": split, "eval_max_length": t.eval_max_length}
