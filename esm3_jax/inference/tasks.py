"""The protein tasks on top of the generation engine: `esm3-jax fold` and `esm3-jax inverse-fold`.

fold: sequences -> structure tokens (one argmax pass by default, as the reference's examples do;
`--num-steps` for iterative unmasking), decoded by the structure decoder to one PDB per protein
with per-residue pLDDT x 100 in the B-factors; pTM and mean pLDDT printed and in summary.json;
with `--native` also backbone RMSD, LDDT-CA and TM-score against a known structure.

inverse-fold: a chain's backbone coordinates -> sequences. Conditioned on coordinates only (the
geometric attention reads them; the structure tokens stay masked, as the reference's inverse
folding with `condition_on_coordinates_only` does); written as FASTA with the sequence recovery
against the file's own sequence.

Both are thin layers over inference/generate.py's `generate`: the batching, length buckets and
seeding are the engine's. FASTA is read with biotite (inference/ sits below data/ and may not
use data/sources.py).
"""

from __future__ import annotations

import argparse
import json
import re
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

from esm3_jax import tokens as T
from esm3_jax.batch import stack_proteins
from esm3_jax.inference.forward import load_esm3
from esm3_jax.inference.generate import generate
from esm3_jax.inference.structure_tokenizer import StructureTokenizer, decoded_chain
from esm3_jax.structure import geometry
from esm3_jax.structure.chain import ProteinChain
from esm3_jax.structure.io import chain_name, load_structure, write_structure

STANDARD_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
# What fold accepts: the 20, X (unknown) and the ambiguity/rare codes the vocabulary has.
FOLD_LETTERS = frozenset(STANDARD_AMINO_ACIDS + "XBUZO")
# Sequence ids inverse folding never samples: the vocabulary's amino-acid-like ids that are not
# one of the 20 (X, B, U, Z, O, '.', '-'); the reference may emit them, a design should not.
NONSTANDARD_SEQUENCE_IDS = tuple(
    i for i, tok in enumerate(T.SEQUENCE_VOCAB) if len(tok) == 1 and tok not in STANDARD_AMINO_ACIDS
)


# --- input ---------------------------------------------------------------------------------------


def read_fasta(path: str | Path) -> list[tuple[str, str]]:
    """[(name, sequence)] in file order; the name is the header's first word. An empty file,
    text before the first header, a repeated name or an empty sequence is a ValueError naming the file."""
    import biotite
    from biotite.sequence.io import fasta

    path = Path(path)
    # Not is_file(): a pipe such as bash's process substitution <(...) (/dev/fd/N) is no regular
    # file, yet reads like one; it is read exactly once, here.
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such FASTA file")
    if path.is_dir():
        raise ValueError(f"{path}: a folder, not a FASTA file")
    try:
        ff = fasta.FastaFile.read(str(path))
    except (biotite.InvalidFileError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a FASTA file ({e})") from e
    # FastaFile is a dict: a repeated header would silently replace the first, so count the lines.
    headers = [line[1:].strip() for line in ff.lines if line.startswith(">")]
    names = [h.split()[0] if h.split() else "" for h in headers]
    if not names:
        raise ValueError(f"{path}: no FASTA entries")
    seen: set[str] = set()
    for name in names:
        if not name:
            raise ValueError(f"{path}: an entry has an empty header")
        if name in seen:
            raise ValueError(f"{path}: header '{name}' appears twice")
        seen.add(name)
    out = []
    for header, seq in ff.items():
        name = header.split()[0]
        if not seq:
            raise ValueError(f"{path}: entry '{name}' has an empty sequence")
        out.append((name, seq))
    return out


def check_sequence(seq: str, where: str) -> str:
    """The sequence (spaces dropped) if every letter is an upper-case amino-acid code, else a ValueError."""
    seq = "".join(seq.split())
    if not seq:
        raise ValueError(f"{where}: empty sequence")
    for i, c in enumerate(seq):
        if c not in FOLD_LETTERS:
            raise ValueError(f"{where}: character {c!r} at position {i + 1} is not an amino-acid letter "
                             f"(upper-case {STANDARD_AMINO_ACIDS}, or X/B/U/Z/O)")
    return seq


def _file_names(names: list[str]) -> list[str]:
    """File-system-safe, unique stems for protein names."""
    out, seen = [], set()
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "protein"
        base, k = stem, 1
        while stem in seen:
            k += 1
            stem = f"{base}_{k}"
        seen.add(stem)
        out.append(stem)
    return out


# --- fold ----------------------------------------------------------------------------------------


def fold_inputs(sequences: list[str]) -> dict[str, np.ndarray]:
    """The engine's inputs for folding: the sequences, structure tokens all mask (nothing else,
    as the reference's folding of a bare sequence)."""
    rows = []
    for seq in sequences:
        x = T.encode_protein(seq)
        rows.append({k: x[k] for k in ("sequence_tokens", "structure_tokens")})
    return stack_proteins(rows)


def fold(
    cfg: Any,
    params: Any,
    tokenizer: StructureTokenizer,
    sequences: list[str],
    *,
    num_steps: int = 1,
    temperature: float = 0.0,
    strategy: str = "entropy",
    seed: int = 0,
    batch_size: int | None = None,
    source: str = "sequences",
) -> list[dict[str, Any]]:
    """Per sequence: {'structure_tokens' (L,), 'backbone' (L, 3, 3), 'plddt' (L,) in [0, 1],
    'ptm', 'mean_plddt'}. Structure tokens come from `generate` on the structure track (argmax,
    entropy order, no annealing by default), then the decoder builds the backbone."""
    x = fold_inputs(sequences)
    out = generate(cfg, params, x, "structure", num_steps, strategy=strategy, temperature=temperature,
                   temperature_annealing=temperature > 0, seed=seed, batch_size=batch_size, source=source)
    results = []
    for row, seq in zip(out["structure_tokens"], sequences):
        codes = row[1 : len(seq) + 1].astype(np.int32)
        dec = tokenizer.decode(codes, sequence=seq if tokenizer.decoder_config.sequence_conditioning else None)
        results.append({"structure_tokens": codes, "backbone": dec["backbone"], "plddt": dec["plddt"],
                        "atom37": dec.get("atom37"), "ptm": dec["ptm"], "mean_plddt": float(np.mean(dec["plddt"]))})
    return results


def compare_to_native(backbone_Lx3x3: np.ndarray, sequence: str, native: ProteinChain) -> dict[str, float]:
    """Backbone (N, CA, C) RMSD after superposition and LDDT-CA, residue i against residue i (the
    lengths must agree); TM-score by TM-align (its own alignment), normalised by the native."""
    if len(native) != len(sequence):
        raise ValueError(f"{native.source or 'native'} chain {native.chain_id!r} has {len(native)} residues, "
                         f"the folded sequence {len(sequence)}: RMSD and LDDT compare residue by residue")
    pred = np.asarray(backbone_Lx3x3, np.float64)
    true = np.asarray(native.backbone, np.float64)
    return {
        "backbone_rmsd": geometry.rmsd(pred.reshape(-1, 3), true.reshape(-1, 3)),
        "lddt_ca": float(geometry.lddt_ca(pred[:, 1], true[:, 1])),
        "tm_score": geometry.tm_score(pred[:, 1], true[:, 1], sequence, native.sequence),
    }


def _write_pdb(path: Path, sequence: str, result: dict[str, Any]) -> Path:
    return write_structure(path, decoded_chain(result, sequence))


def _add_fold_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="esm3-jax checkpoint (from `convert` or training)")
    p.add_argument("--decoder", required=True, help="structure-decoder checkpoint (`convert --kind structure-decoder`, `train-vqvae`)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--sequence", help="one amino-acid sequence")
    src.add_argument("--fasta", help="FASTA of proteins to fold (one PDB each, named by the header's first word)")
    p.add_argument("--out-dir", required=True, help="folder for NAME.pdb (pLDDT x 100 in the B-factors), summary.json, structure_tokens.npz")
    p.add_argument("--num-steps", type=int, default=1, help="unmasking steps (default 1: one argmax pass)")
    p.add_argument("--temperature", type=float, default=0.0, help="structure-token sampling temperature (default 0: argmax)")
    p.add_argument("--strategy", default="entropy", help="which positions unmask first when --num-steps > 1: entropy or random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--native", default=None, help="a known structure of the (single) protein: adds backbone RMSD, LDDT-CA, TM-score")
    p.add_argument("--chain", default=None, help="the native's chain (default: its first protein chain)")
    p.add_argument("--batch-size", type=int, default=None, help="proteins per compiled step (default: all)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype (default: the checkpoint's)")


def _fold_main(args: argparse.Namespace) -> int:
    # Every input is checked before a checkpoint is read.
    if args.fasta:
        source = str(args.fasta)
        entries = [(name, check_sequence(seq, f"{args.fasta}: entry '{name}'")) for name, seq in read_fasta(args.fasta)]
    else:
        source = "--sequence"
        entries = [("protein", check_sequence(args.sequence, "--sequence"))]
    native = None
    if args.native:
        if len(entries) != 1:
            raise ValueError(f"--native {args.native}: compares against one protein, but {source} holds {len(entries)}")
        if not Path(args.native).is_file():
            raise FileNotFoundError(f"{args.native}: no such structure file")
        native = load_structure(args.native, args.chain)[0]
        if len(native) != len(entries[0][1]):
            raise ValueError(f"{args.native} chain {native.chain_id!r} has {len(native)} residues, the sequence "
                             f"{len(entries[0][1])}: RMSD and LDDT compare residue by residue")
    tokenizer = StructureTokenizer.load(decoder_dir=args.decoder)
    cfg, params = load_esm3(args.checkpoint, args.dtype)
    started = time.perf_counter()
    names = [n for n, _ in entries]
    sequences = [s for _, s in entries]
    results = fold(cfg, params, tokenizer, sequences, num_steps=args.num_steps, temperature=args.temperature,
                   strategy=args.strategy, seed=args.seed, batch_size=args.batch_size, source=source)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"checkpoint": str(args.checkpoint), "decoder": str(args.decoder), "num_steps": args.num_steps,
                               "temperature": args.temperature, "proteins": []}
    tokens_out = {}
    for name, stem, seq, r in zip(names, _file_names(names), sequences, results):
        pdb = _write_pdb(out_dir / f"{stem}.pdb", seq, r)
        entry = {"name": name, "pdb": pdb.name, "length": len(seq), "sequence": seq,
                 "ptm": r["ptm"], "mean_plddt": r["mean_plddt"]}
        if native is not None:
            entry.update({"native": str(args.native), "native_chain": native.chain_id,
                          **compare_to_native(r["backbone"], seq, native)})
        summary["proteins"].append(entry)
        tokens_out[stem] = r["structure_tokens"]
        line = f"{name}\tlength={len(seq)}\tpTM={r['ptm']:.4f}\tmean_pLDDT={r['mean_plddt']:.4f}"
        if native is not None:
            line += f"\tRMSD={entry['backbone_rmsd']:.2f}\tLDDT_CA={entry['lddt_ca']:.4f}\tTM={entry['tm_score']:.4f}"
        print(line + f"\t-> {pdb}")
    np.savez(out_dir / "structure_tokens.npz", **tokens_out)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"fold: {len(results)} protein(s) in {time.perf_counter() - started:.1f} s (compilation included) "
          f"-> {out_dir / 'summary.json'}")
    return 0


# --- inverse fold --------------------------------------------------------------------------------


def inverse_fold_inputs(backbone_Lx3x3: np.ndarray, num_samples: int) -> dict[str, np.ndarray]:
    """`num_samples` identical rows: the backbone as coordinates, the sequence and structure
    tokens all mask (conditioning on coordinates only)."""
    n = len(backbone_Lx3x3)
    x = T.encode_protein(T.MASK_CHAR * n, coords=backbone_Lx3x3)
    return {k: np.repeat(x[k][None], num_samples, axis=0) for k in ("sequence_tokens", "structure_tokens", "structure_coords")}


def sequence_recovery(designed: str, native: str) -> float:
    """Fraction of the native's standard residues (the 20; X and the like are not scored) that
    the design reproduces; NaN when the native has none."""
    scored = [(d, n) for d, n in zip(designed, native) if n in STANDARD_AMINO_ACIDS]
    return float(np.mean([d == n for d, n in scored])) if scored else float("nan")


def inverse_fold(
    cfg: Any,
    params: Any,
    chain: ProteinChain,
    *,
    num_samples: int = 1,
    num_steps: int = 8,
    temperature: float = 0.1,
    strategy: str = "random",
    temperature_annealing: bool = True,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int | None = None,
    source: str = "structure",
) -> list[str]:
    """`num_samples` sequences for the chain's backbone, only the 20 standard amino acids; sample
    i depends on the seed and i only (the engine keys its draws by row)."""
    if num_samples < 1:
        raise ValueError(f"{source}: num_samples must be >= 1, got {num_samples}")
    x = inverse_fold_inputs(chain.backbone, num_samples)
    out = generate(cfg, params, x, "sequence", num_steps, strategy=strategy, temperature=temperature,
                   temperature_annealing=temperature_annealing, top_p=top_p, seed=seed, batch_size=batch_size,
                   never_sample=NONSTANDARD_SEQUENCE_IDS, source=source)
    return [T.decode_sequence(row) for row in out["sequence_tokens"]]


def _add_inverse_fold_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="esm3-jax checkpoint (from `convert` or training)")
    p.add_argument("--structure", required=True, help="PDB/mmCIF file (optionally .gz)")
    p.add_argument("--chain", default=None, help="chain id (default: the file's first protein chain)")
    p.add_argument("--out", required=True, help="output FASTA of the designed sequences")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.1, help="sampling temperature, annealed as the reference does (0: argmax)")
    p.add_argument("--num-steps", type=int, default=8, help="unmasking steps (capped at the chain length)")
    p.add_argument("--strategy", default="random", help="which positions unmask first: random or entropy")
    p.add_argument("--no-temperature-annealing", action="store_true", help="keep the temperature fixed (default: anneal as the reference does)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="samples per compiled step (default: all)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype (default: the checkpoint's)")


def _inverse_fold_main(args: argparse.Namespace) -> int:
    path = Path(args.structure)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such structure file")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    chain = load_structure(path, args.chain)[0]  # StructureError (a ValueError) names the file
    if not chain.backbone_mask.any():
        raise ValueError(f"{path} chain {chain.chain_id!r}: no residue has N, CA and C coordinates")
    cfg, params = load_esm3(args.checkpoint, args.dtype)
    started = time.perf_counter()
    designs = inverse_fold(cfg, params, chain, num_samples=args.num_samples, num_steps=args.num_steps,
                           temperature=args.temperature, strategy=args.strategy,
                           temperature_annealing=not args.no_temperature_annealing, top_p=args.top_p, seed=args.seed,
                           batch_size=args.batch_size, source=str(path))
    recoveries = [sequence_recovery(d, chain.sequence) for d in designs]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", chain_name(path, chain.chain_id))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(f">{stem}_sample{i} recovery={r:.4f}\n{d}\n" for i, (d, r) in enumerate(zip(designs, recoveries))))
    print(f"inverse-fold: {path} chain {chain.chain_id!r}, {len(chain)} residues, {len(designs)} sample(s) in "
          f"{time.perf_counter() - started:.1f} s (compilation included) -> {out}")
    print(f"  native    {chain.sequence}")
    for i, (d, r) in enumerate(zip(designs, recoveries)):
        print(f"  sample {i:<2d} {d}  recovery={r:.4f}")
    print(f"sequence recovery: mean {np.nanmean(recoveries) if not np.all(np.isnan(recoveries)) else float('nan'):.4f} "
          f"over {len(designs)} sample(s)")
    return 0


# cli.py: "fold" -> FOLD_VERB, "inverse-fold" -> INVERSE_FOLD_VERB
FOLD_VERB = types.SimpleNamespace(add_cli_arguments=_add_fold_arguments, cli_main=_fold_main)
INVERSE_FOLD_VERB = types.SimpleNamespace(add_cli_arguments=_add_inverse_fold_arguments, cli_main=_inverse_fold_main)
