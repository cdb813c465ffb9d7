"""`esm3-jax decode-structure`: structure tokens (.npz) -> one PDB per chain (backbone, or every
heavy atom for an all-atom decoder), with pTM."""

from __future__ import annotations

import argparse

from esm3_jax.structure_tokenizer import decode_token_file, read_fasta


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decoder", required=True, help="structure-decoder checkpoint directory (esm3-jax convert)")
    p.add_argument("--tokens", required=True, help=".npz of per-chain token arrays (tokenize-structure's output)")
    p.add_argument("--out-dir", required=True, help="folder for the PDB files (pLDDT x 100 in the B-factors)")
    p.add_argument("--sequences", default=None,
                   help="FASTA of the chains' sequences keyed like the .npz (tokenize-structure --fasta); "
                        "required by sequence-conditioned (e.g. all-atom) decoders")


def cli_main(args: argparse.Namespace) -> int:
    sequences = read_fasta(args.sequences) if args.sequences else None
    for key, ptm in decode_token_file(args.decoder, args.tokens, args.out_dir, sequences).items():
        print(f"{key}\tpTM={ptm:.4f}")
    return 0
