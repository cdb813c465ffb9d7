"""`esm3-jax tokenize-structure`: structure files -> one structure-token array per chain (.npz)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from esm3_jax.structure_tokenizer import tokenize_files, write_fasta


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", required=True, help="structure-encoder checkpoint directory (esm3-jax convert)")
    p.add_argument("--out", required=True, help="output .npz: one int32 array per chain, keyed '<file name>/<chain id>'")
    p.add_argument("--fasta", default=None,
                   help="also write the chains' sequences, keyed like the .npz (for sequence-conditioned decoders)")
    p.add_argument("files", nargs="+", help="PDB / mmCIF files (optionally .gz)")


def cli_main(args: argparse.Namespace) -> int:
    tokens, sequences = tokenize_files(args.encoder, args.files)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **tokens)
    if args.fasta:
        write_fasta(args.fasta, sequences)
    n_res = sum(len(t) for t in tokens.values())
    print(f"wrote {args.out}: {len(tokens)} chains, {n_res} residues (-1 = residue without backbone)")
    return 0
