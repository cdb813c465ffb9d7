"""`esm3-jax predict-function`: a protein's function tokens and residue annotations from an ESM3
checkpoint, read out as keywords, labels and InterPro ids over residue ranges.

The model: the function track all mask, conditioned on what is given (a sequence; or a structure
file's chain: its sequence and N/CA/C coordinates, plus its VQ-VAE structure tokens when an
encoder is given, as the reference encodes a protein), filled by the generation engine
(inference/generate.py; one pass by default, the reference's forward_and_sample). Residue
annotations come from that first pass, as the reference samples them: the 16 highest logits of
each residue, kept where sigmoid >= 0.5.

The read-out:
  (a) function tokens -> the user's function vocabulary (`build-function-vocab`): per residue the
      label(s) or keyword(s) whose LSH signature is nearest in Hamming distance (<= --max-hamming
      bits), similarity cos(pi d / 64) (the LSH estimate of the TF-IDF cosine);
  (b) residue-annotation ids -> names (`--residue-vocab`, else the reference's token names <ra:ID>);
  (c) with --function-decoder, the ported decoder's keywords (p >= 0.5) and InterPro ids (p >= 0.1).
Every per-residue hit list becomes ranges per label as the reference merges them (gaps of up to
--merge-gap residues joined, ranges shorter than --min-length dropped), residues numbered 1..L.
The JSON keeps each source's --max-hits highest-scoring ranges per protein (random or untrained
weights give thousands: megabytes of noise) and says how many it left out.

It lives in data/ (not inference/) because the function vocabulary is data/function_tokens.py's.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from esm3_jax import tokens as T
from esm3_jax.batch import stack_proteins
from esm3_jax.data import function_tokens as ft
from esm3_jax.inference.forward import forward, load_esm3
from esm3_jax.inference.function_decoder import FunctionDecoder, decode_function_tokens, label_ranges
from esm3_jax.inference.generate import generate
from esm3_jax.inference.structure_tokenizer import StructureTokenizer
from esm3_jax.inference.tasks import check_sequence, read_fasta
from esm3_jax.structure.io import chain_name, load_structure

RESIDUE_THRESHOLD = 0.5  # the reference's sample_residue_annotation_logits
# The range lists of a read-out, and what the printed table calls them.
RANGE_SOURCES = {"function_keywords": "vocab", "residue_annotations": "residue annotation",
                 "decoder_keywords": "decoder keyword", "decoder_interpro": "decoder InterPro"}


# --- residue-annotation names ---------------------------------------------------------------------


def read_residue_vocab(path: str | Path) -> list[str]:
    """Names of residue-annotation ids 0..1477: from the reference's label CSV (columns label,
    label_clean, count: labels ordered by total count, descending, ties alphabetical, as its
    tokenizer orders them) or a text file naming ids 4, 5, ... one per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such residue-annotation vocabulary file")
    text = path.read_text()
    first = text.split("\n", 1)[0]
    if "label_clean" in first.split(","):
        counts: dict[str, float] = collections.defaultdict(float)
        for row in csv.DictReader(text.splitlines()):
            try:
                counts[row["label_clean"]] += float(row["count"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: rows need label_clean and a numeric count, got {row}") from None
        labels = sorted(sorted(counts), key=lambda k: -counts[k])
    else:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    n = T.RESIDUE_VOCAB_SIZE - T.RESIDUE_FIRST_LABEL
    if len(labels) > n:
        raise ValueError(f"{path}: {len(labels)} residue-annotation names, the vocabulary has room for {n}")
    names = ["<pad>", "<motif>", "<unk>", "<none>"] + labels
    return names + [f"<ra:{i}>" for i in range(len(names), T.RESIDUE_VOCAB_SIZE)]


def default_residue_names() -> list[str]:
    """The reference tokenizer's own token names, <ra:ID>, for ids without a vocabulary file."""
    return ["<pad>", "<motif>", "<unk>", "<none>"] + [f"<ra:{i}>" for i in range(T.RESIDUE_FIRST_LABEL, T.RESIDUE_VOCAB_SIZE)]


def residue_annotation_hits(residue_logits_LxV: np.ndarray) -> list[tuple[int, int, float]]:
    """(position, id, probability): per residue the 16 highest-logit ids with sigmoid >= 0.5,
    site labels only (ids >= 4; the reference's decode drops the specials and <none>)."""
    logits = np.asarray(residue_logits_LxV, np.float64)
    top_LxK = np.argsort(-logits, axis=-1, kind="stable")[:, : T.RESIDUE_MAX_ANNOTATIONS]
    prob_LxK = 1.0 / (1.0 + np.exp(-np.take_along_axis(logits, top_LxK, axis=-1)))
    keep = (prob_LxK >= RESIDUE_THRESHOLD) & (top_LxK >= T.RESIDUE_FIRST_LABEL)
    return [(int(p), int(top_LxK[p, k]), float(prob_LxK[p, k])) for p, k in zip(*np.nonzero(keep))]


# --- the prediction -------------------------------------------------------------------------------


def function_inputs(sequence: str, backbone_Lx3x3: np.ndarray | None = None,
                    structure_tokens_L: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One protein's model inputs with the function track all mask (pad = 0)."""
    x = T.encode_protein(sequence, coords=backbone_Lx3x3, structure_tokens=structure_tokens_L)
    keys = ["sequence_tokens", "structure_tokens", "function_tokens", "average_plddt", "per_res_plddt"]
    if backbone_Lx3x3 is not None:
        keys.append("structure_coords")
    return {k: x[k] for k in keys}


def predict_function(
    cfg: Any,
    params: Any,
    proteins: list[dict[str, np.ndarray]],
    *,
    num_steps: int = 1,
    temperature: float = 1.0,
    temperature_annealing: bool = True,
    strategy: str = "random",
    seed: int = 0,
    batch_size: int | None = None,
    source: str = "proteins",
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per protein: ((L, 8) function tokens, (L, 1478) residue-annotation logits of the first
    pass), BOS/EOS dropped. `proteins`: `function_inputs` dicts."""
    x = stack_proteins(proteins)
    lengths = [len(p["sequence_tokens"]) for p in proteins]
    out = generate(cfg, params, x, "function", num_steps, strategy=strategy, temperature=temperature,
                   temperature_annealing=temperature_annealing, seed=seed, batch_size=batch_size, source=source)
    # The first pass, on the prompt: padding keeps sequence_id 0 so no row attends to it.
    L = x["sequence_tokens"].shape[1]
    inside = np.arange(L)[None, :] < np.array(lengths)[:, None]
    logits = forward(cfg, params, {**x, "sequence_id": inside.astype(np.int32)}, batch_size)["residue_logits"]
    tokens = [out["function_tokens"][i, 1 : n - 1] for i, n in enumerate(lengths)]
    residue = [np.asarray(logits[i, 1 : n - 1], np.float32) for i, n in enumerate(lengths)]
    return tokens, residue


def read_out(
    tokens_LxD: np.ndarray,
    residue_logits_LxV: np.ndarray,
    vocab: ft.FunctionVocab,
    *,
    residue_names: list[str],
    decoder: FunctionDecoder | None = None,
    max_hamming: int = 10,
    merge_gap: int = 3,
    min_length: int = 5,
) -> dict[str, list[dict]]:
    """One protein's tokens and residue logits -> the (a), (b), (c) ranges of the module doc."""
    ranges = lambda hits: label_ranges(hits, merge_gap=merge_gap, min_length=min_length)  # noqa: E731
    matches, nearest_L = ft.nearest_function_labels(vocab, tokens_LxD, max_hamming)
    vocab_ranges = ranges([(p, name, math.cos(math.pi * d / (vocab.depth * vocab.bits))) for p, name, d in matches])
    for r in vocab_ranges:
        r["kind"] = "label" if r["label"] in vocab.label_keywords else "keyword"
        r["keywords"] = ft.label_top_keywords(vocab, r["label"])
    residue_ranges = ranges([(p, residue_names[i], prob) for p, i, prob in residue_annotation_hits(residue_logits_LxV)])
    result = {"function_keywords": vocab_ranges, "residue_annotations": residue_ranges,
              "vocab_nearest_hamming": nearest_L.tolist()}
    if decoder is not None:
        decoded = decode_function_tokens(decoder, tokens_LxD, merge_gap=merge_gap, min_length=min_length)
        result["decoder_keywords"], result["decoder_interpro"] = decoded["keywords"], decoded["interpro"]
    return result


def by_score(ranges: list[dict]) -> list[dict]:
    """Highest score first; ties by start, then label (so the order is reproducible)."""
    return sorted(ranges, key=lambda r: (-r["score"], r["start"], r["label"]))


def keep_top_ranges(result: dict[str, Any], max_hits: int) -> dict[str, Any]:
    """`result` with each range list ranked by score and cut to its `max_hits` best (0: all), plus
    `left_out`: how many ranges each list lost."""
    out = dict(result)
    out["left_out"] = {}
    for key in RANGE_SOURCES:
        if key in result:
            ranked = by_score(result[key])
            out[key] = ranked[:max_hits] if max_hits else ranked
            out["left_out"][key] = len(ranked) - len(out[key])
    return out


# --- the verb -------------------------------------------------------------------------------------


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="esm3-jax checkpoint (from `convert` or training)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--sequence", help="one amino-acid sequence")
    src.add_argument("--fasta", help="FASTA of proteins (one result each, named by the header's first word)")
    src.add_argument("--structure", help="PDB/mmCIF file (optionally .gz): its chain's sequence and backbone coordinates")
    p.add_argument("--chain", default=None, help="with --structure: the chain (default: the file's first protein chain)")
    p.add_argument("--encoder", default=None, help="with --structure: a structure-encoder checkpoint, to condition on "
                   "the chain's VQ-VAE structure tokens too (as the reference does)")
    p.add_argument("--structure-only", action="store_true", help="with --structure: leave the sequence masked "
                   "(condition on the structure alone)")
    p.add_argument("--function-vocab", required=True, help="folder from `build-function-vocab` (or the release's files): "
                   "the vocabulary the checkpoint's function tokens were made with")
    p.add_argument("--function-decoder", default=None, help="function-decoder checkpoint (`convert --kind function-decoder`):"
                   " adds its keywords and InterPro ids")
    p.add_argument("--residue-vocab", default=None, help="names of the residue-annotation ids: the reference's label CSV "
                   "(label,label_clean,count) or one name per line for ids 4, 5, ... (default: <ra:ID>)")
    p.add_argument("--num-steps", type=int, default=1, help="unmasking steps for the function track (default 1: one pass)")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature of the <none> rule (the reference's default 1)")
    p.add_argument("--no-temperature-annealing", action="store_true", help="keep the temperature fixed over the steps")
    p.add_argument("--strategy", default="random", help="which positions unmask first when --num-steps > 1: random or entropy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-hamming", type=int, default=10, help="furthest LSH signature (bits of 64) that counts as a match")
    p.add_argument("--merge-gap", type=int, default=3, help="join a label's runs across gaps of up to this many residues")
    p.add_argument("--min-length", type=int, default=5, help="drop ranges shorter than this many residues")
    p.add_argument("--top", type=int, default=10, help="ranges printed per source and protein, highest score first")
    p.add_argument("--max-hits", type=int, default=50, help="ranges the JSON keeps per source and protein, highest score "
                   "first; its left_out says how many were dropped (0: keep all)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--batch-size", type=int, default=None, help="proteins per compiled step (default: all)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype (default: the checkpoint's)")


def _read_proteins(args: argparse.Namespace) -> tuple[str, list[tuple[str, str, dict[str, np.ndarray]]]]:
    """(source, [(name, sequence, inputs)]), every input checked."""
    if args.structure is None and (args.chain or args.encoder or args.structure_only):
        raise ValueError("--chain, --encoder and --structure-only go with --structure")
    if args.fasta:
        entries = [(n, check_sequence(s, f"{args.fasta}: entry '{n}'")) for n, s in read_fasta(args.fasta)]
        return str(args.fasta), [(n, s, function_inputs(s)) for n, s in entries]
    if args.sequence is not None:
        seq = check_sequence(args.sequence, "--sequence")
        return "--sequence", [("protein", seq, function_inputs(seq))]
    path = Path(args.structure)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such structure file")
    chain = load_structure(path, args.chain)[0]  # StructureError (a ValueError) names the file
    if not chain.backbone_mask.any():
        raise ValueError(f"{path} chain {chain.chain_id!r}: no residue has N, CA and C coordinates")
    codes = None
    if args.encoder:
        codes = StructureTokenizer.load(encoder_dir=args.encoder).tokenize(chain.backbone, chain.residue_index)
    seq = T.MASK_CHAR * len(chain) if args.structure_only else chain.sequence
    name = chain_name(path, chain.chain_id)
    return str(path), [(name, chain.sequence, function_inputs(seq, chain.backbone, codes))]


def _table(name: str, length: int, tokens: np.ndarray, result: dict[str, list[dict]], top: int) -> list[str]:
    """The printed summary: per source its `top` highest-scoring ranges."""
    has = int(np.all(tokens >= T.FUNCTION_LSH_OFFSET, axis=1).sum())
    none = int(np.all(tokens == T.FUNCTION_NONE, axis=1).sum())
    nearest = np.array([d for d in result["vocab_nearest_hamming"] if d >= 0])
    near = (f"; nearest vocabulary signature {nearest.min()}-{nearest.max()} bits away (median "
            f"{np.median(nearest):g})" if len(nearest) else "")
    lines = [f"{name}: {length} residues; function tokens at {has}, <none> at {none}{near}",
             f"  {'range':<11} {'source':<18} {'label':<52} score"]
    for key, what in RANGE_SOURCES.items():
        if key not in result:
            continue
        ranges = by_score(result[key])
        if not ranges:
            lines.append(f"  {'-':<11} {what:<18} (none above the threshold)")
        for r in ranges[:top]:
            label = r["label"]
            if r.get("kind") == "label":
                label = f"{label} ({', '.join(r['keywords'][:3])})"
            lines.append(f"  {r['start']:>4}-{r['end']:<6} {what:<18} {label[:52]:<52} {r['score']:.3f}")
        if len(ranges) > top:
            lines.append(f"  {'':<11} {what:<18} ... {len(ranges) - top} more ranges (--top)")
    return lines


def cli_main(args: argparse.Namespace) -> int:
    # Every input is checked before a checkpoint is read.
    for flag, v in (("--num-steps", args.num_steps), ("--min-length", args.min_length)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    for flag, v in (("--merge-gap", args.merge_gap), ("--max-hamming", args.max_hamming), ("--max-hits", args.max_hits)):
        if v < 0:
            raise ValueError(f"{flag} must be >= 0, got {v}")
    source, proteins = _read_proteins(args)
    vocab = ft.load_function_vocab_dir(args.function_vocab)
    residue_names = read_residue_vocab(args.residue_vocab) if args.residue_vocab else default_residue_names()
    decoder = FunctionDecoder.load(args.function_decoder) if args.function_decoder else None
    cfg, params = load_esm3(args.checkpoint, args.dtype)
    started = time.perf_counter()
    tokens, residue_logits = predict_function(
        cfg, params, [x for _, _, x in proteins], num_steps=args.num_steps, temperature=args.temperature,
        temperature_annealing=not args.no_temperature_annealing, strategy=args.strategy, seed=args.seed,
        batch_size=args.batch_size, source=source)
    summary: dict[str, Any] = {
        "checkpoint": str(args.checkpoint), "function_vocab": str(args.function_vocab),
        "function_decoder": args.function_decoder, "residue_vocab": args.residue_vocab, "source": source,
        "num_steps": args.num_steps, "temperature": args.temperature, "seed": args.seed,
        "max_hamming": args.max_hamming, "merge_gap": args.merge_gap, "min_length": args.min_length,
        "max_hits": args.max_hits, "proteins": [],
    }
    for (name, seq, _), tok, logits in zip(proteins, tokens, residue_logits):
        result = read_out(tok, logits, vocab, residue_names=residue_names, decoder=decoder, max_hamming=args.max_hamming,
                          merge_gap=args.merge_gap, min_length=args.min_length)
        print("\n".join(_table(name, len(seq), tok, result, args.top)))
        summary["proteins"].append({"name": name, "length": len(seq), "sequence": seq,
                                    "function_tokens": tok.astype(int).tolist(), **keep_top_ranges(result, args.max_hits)})
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"predict-function: {len(proteins)} protein(s) in {time.perf_counter() - started:.1f} s "
          f"(compilation included)" + (f" -> {args.out}" if args.out else ""))
    return 0
