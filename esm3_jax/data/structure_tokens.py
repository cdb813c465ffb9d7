"""Structure files <-> structure-token files: the `tokenize-structure` and `decode-structure` verbs.

tokenize-structure: PDB/mmCIF chains -> one VQ-VAE token array per chain (.npz), optionally their
sequences as FASTA; decode-structure: such an .npz -> one PDB per chain (backbone, or every heavy
atom for an all-atom decoder) with pLDDT in the B-factors, and pTM. The tokenizer itself is
inference/structure_tokenizer.py; these verbs are its file-level batch jobs, here beside the other
input readers (FASTA comes from data/sources.py).
"""

from __future__ import annotations

import argparse
import types
from pathlib import Path

import numpy as np

from esm3_jax.data.sources import iter_fasta
from esm3_jax.inference.structure_tokenizer import StructureTokenizer, decoded_chain
from esm3_jax.structure.io import load_structure, write_structure


def tokenize_files(encoder_dir: str | Path, files: list[str | Path]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({'<file name>/<chain id>': (L,) codes}, {same key: one-letter sequence}) for every
    protein chain of every file. Sequence-conditioned decoders need the sequences back."""
    tok = StructureTokenizer.load(encoder_dir=encoder_dir)
    out: dict[str, np.ndarray] = {}
    sequences: dict[str, str] = {}
    for f in files:
        for chain in load_structure(f):  # StructureError names the file and chain
            key = f"{Path(f).name}/{chain.chain_id}"
            if key in out:
                raise ValueError(f"{f}: key '{key}' already taken by another file of the same name")
            try:
                out[key] = tok.tokenize(chain.backbone, chain.residue_index)
            except ValueError as e:
                raise ValueError(f"{f} chain {chain.chain_id!r}: {e}") from e
            sequences[key] = chain.sequence
    return out, sequences


def write_fasta(path: str | Path, sequences: dict[str, str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f">{key}\n{seq}\n" for key, seq in sequences.items()))
    return path


def read_fasta(path: str | Path) -> dict[str, str]:
    """{header: sequence}; a repeated header or text before the first one is an error."""
    out: dict[str, str] = {}
    for entry in iter_fasta(path):
        header, seq = entry.data
        if header is None:
            raise ValueError(f"{entry.location}: text before the first '>' header")
        if header in out:
            raise ValueError(f"{entry.location}: header '{header}' appears twice")
        out[header] = seq
    return out


def decode_token_file(
    decoder_dir: str | Path, tokens_npz: str | Path, out_dir: str | Path, sequences: dict[str, str] | None = None
) -> dict[str, float]:
    """Write one PDB per key of the .npz (pLDDT x 100 in the B-factors); returns {key: pTM}.

    A sequence-conditioned decoder needs `sequences` ({npz key: one-letter sequence}); an
    all-atom decoder writes every heavy atom it builds, a backbone-only one N, CA, C and the
    geometrically placed O.
    """
    tokens_npz = Path(tokens_npz)
    if not tokens_npz.is_file():
        raise FileNotFoundError(f"{tokens_npz}: no such file")
    tok = StructureTokenizer.load(decoder_dir=decoder_dir)
    if tok.decoder_config.sequence_conditioning and sequences is None:
        raise ValueError(f"{decoder_dir}: this decoder is sequence-conditioned: give the chains' sequences "
                         "(a FASTA keyed like the .npz, as `tokenize-structure --fasta` writes)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ptms = {}
    with np.load(tokens_npz) as npz:
        for key in npz.files:
            codes = npz[key]
            if codes.ndim != 1 or codes.dtype.kind not in "iu":
                raise ValueError(f"{tokens_npz}: '{key}' must be a 1-D integer array, got {codes.dtype} {codes.shape}")
            sequence = None
            if tok.decoder_config.sequence_conditioning:
                if key not in sequences:
                    raise ValueError(f"{tokens_npz}: no sequence given for '{key}'")
                sequence = sequences[key]
            try:
                dec = tok.decode(codes, sequence=sequence)
            except ValueError as e:
                raise ValueError(f"{tokens_npz}: '{key}': {e}") from e
            chain = decoded_chain(dec, sequence or "X" * len(codes), chain_id=key.rsplit("/", 1)[-1] or "A")
            write_structure(out_dir / (key.replace("/", "_") + ".pdb"), chain)
            ptms[key] = dec["ptm"]
    return ptms


# --- the verbs (cli.py: "tokenize-structure" -> TOKENIZE_VERB, "decode-structure" -> DECODE_VERB) ---


def _add_tokenize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", required=True, help="structure-encoder checkpoint directory (esm3-jax convert)")
    p.add_argument("--out", required=True, help="output .npz: one int32 array per chain, keyed '<file name>/<chain id>'")
    p.add_argument("--fasta", default=None,
                   help="also write the chains' sequences, keyed like the .npz (for sequence-conditioned decoders)")
    p.add_argument("files", nargs="+", help="PDB / mmCIF files (optionally .gz)")


def _tokenize_main(args: argparse.Namespace) -> int:
    tokens, sequences = tokenize_files(args.encoder, args.files)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **tokens)
    if args.fasta:
        write_fasta(args.fasta, sequences)
    n_res = sum(len(t) for t in tokens.values())
    print(f"wrote {args.out}: {len(tokens)} chains, {n_res} residues (-1 = residue without backbone)")
    return 0


def _add_decode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decoder", required=True, help="structure-decoder checkpoint directory (esm3-jax convert)")
    p.add_argument("--tokens", required=True, help=".npz of per-chain token arrays (tokenize-structure's output)")
    p.add_argument("--out-dir", required=True, help="folder for the PDB files (pLDDT x 100 in the B-factors)")
    p.add_argument("--sequences", default=None,
                   help="FASTA of the chains' sequences keyed like the .npz (tokenize-structure --fasta); "
                        "required by sequence-conditioned (e.g. all-atom) decoders")


def _decode_main(args: argparse.Namespace) -> int:
    sequences = read_fasta(args.sequences) if args.sequences else None
    for key, ptm in decode_token_file(args.decoder, args.tokens, args.out_dir, sequences).items():
        print(f"{key}\tpTM={ptm:.4f}")
    return 0


TOKENIZE_VERB = types.SimpleNamespace(add_cli_arguments=_add_tokenize_arguments, cli_main=_tokenize_main)
DECODE_VERB = types.SimpleNamespace(add_cli_arguments=_add_decode_arguments, cli_main=_decode_main)
