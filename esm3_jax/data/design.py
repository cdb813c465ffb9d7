"""Free design from the command line: `esm3-jax generate --checkpoint CK --length N --out-dir D`.

What: N residues from nothing but prompts: a partial sequence, an SS8 string, motif coordinates
cut from PDB/mmCIF files and placed at chosen positions, function keywords over residue ranges.
The tracks named by `--tracks` are then generated one after another (chain of thought, e.g.
ss8 -> structure -> sequence), each conditioned on the prompts and the tracks before it, for
`--num-samples` rows in one batch. Written to the output folder: design.fasta, one PDB per sample
when a structure decoder is given (pLDDT x 100 in the B-factors), and summary.json (per sample:
sequence, SS8, pTM and mean pLDDT, motif RMSD, and whether every prompted position came out as
prompted).

Why here: the prompts are user files (structures, a function vocabulary) turned into tokens,
which is this package's job; the unmasking is inference/generate.py's engine, unchanged. The
`generate` verb's other form (`--inputs IN.npz --track T --out OUT.npz`, the batch API) is the
engine's own verb; `generate_verb` below takes both and hands that one over.

Positions are 1-based residue numbers throughout (residue 1 = the first after BOS), as in the
function annotations' ranges; `--sequence-offset K` puts the prompt's first letter at residue K+1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
import types
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from esm3_jax import tokens as T
from esm3_jax.batch import stack_proteins
from esm3_jax.data.function_tokens import FunctionAnnotation, load_function_vocab_dir, tokenize_function_annotations
from esm3_jax.inference import generate as engine
from esm3_jax.inference.forward import load_esm3
from esm3_jax.inference.structure_tokenizer import StructureTokenizer, decoded_chain
from esm3_jax.inference.tasks import FOLD_LETTERS, NONSTANDARD_SEQUENCE_IDS
from esm3_jax.structure import geometry
from esm3_jax.structure.io import load_structure, write_structure

DEFAULT_TRACKS = "structure,sequence"
SS8_LETTERS = frozenset("GHITEBSC") | frozenset(k for k in T.SS8_ALIASES if k.strip())
MOTIF_SPEC = re.compile(r"^(?P<file>.+):(?P<chain>[^:@]*):(?P<residues>[^:@]+)@(?P<position>\d+)$")


class DesignError(ValueError):
    """A free-design request that cannot run; the message names the option and the problem."""


@dataclasses.dataclass(frozen=True)
class Motif:
    """Residues of one chain of a structure file, placed at design residues position..position+n-1."""

    spec: str
    path: str
    chain_id: str
    selection: str  # RESIDUES as written
    residues: tuple[str, ...]  # author numbers (with insertion codes) as in the file
    position: int  # 1-based design residue of the first motif residue
    backbone_Nx3x3: np.ndarray
    sequence: str

    @property
    def positions(self) -> range:
        return range(self.position, self.position + len(self.residues))


@dataclasses.dataclass(frozen=True)
class DesignPrompt:
    """Everything the samples are conditioned on, per residue (N = length, no BOS/EOS)."""

    length: int
    sequence: str  # N letters, '_' = free
    ss8: str  # N letters, '_' = free
    backbone_Nx3x3: np.ndarray  # NaN outside the motifs
    function_Nx8: np.ndarray | None  # None: no function prompt
    function_prompted_N: np.ndarray  # bool: residues inside a --function-prompt range
    motifs: tuple[Motif, ...]
    function_prompts: tuple[dict, ...]


# --- prompt parsing (everything is checked before a checkpoint is read) ----------------------------


def _place(text: str, offset: int, length: int, letters: frozenset, option: str) -> str:
    """`text` ('_' = free) at residues offset+1.., as a string of `length` letters."""
    text = "".join(text.split())
    if offset < 0:
        raise DesignError(f"{option}: offset must be >= 0, got {offset}")
    if offset + len(text) > length:
        raise DesignError(f"{option}: {len(text)} letters at offset {offset} run past --length {length}")
    for i, c in enumerate(text):
        if c != T.MASK_CHAR and c not in letters:
            raise DesignError(f"{option}: character {c!r} at prompt position {i + 1} is not one of "
                              f"{''.join(sorted(letters))} (or '_' for free)")
    return T.MASK_CHAR * offset + text + T.MASK_CHAR * (length - offset - len(text))


def _residue_label(number: int, icode: str) -> str:
    return f"{number}{icode}"


def parse_motif(spec: str, length: int) -> Motif:
    """FILE:CHAIN:RESIDUES@POSITION, RESIDUES = author numbers and ranges ('10-25' or '5,7,10-12',
    an insertion code written after the number: '52A'); CHAIN empty = the file's first protein chain."""
    m = MOTIF_SPEC.match(spec)
    if not m:
        raise DesignError(f"--motif {spec!r}: expected FILE:CHAIN:RESIDUES@POSITION, e.g. 1abc.pdb:A:10-25@40")
    path, chain_id, position = m["file"], m["chain"] or None, int(m["position"])
    if not Path(path).is_file():
        raise FileNotFoundError(f"--motif {spec!r}: {path}: no such structure file")
    chain = load_structure(path, chain_id)[0]  # StructureError names the file and chain
    labels = [_residue_label(int(n), str(ic)) for n, ic in zip(chain.residue_index, chain.insertion_code)]
    index_of = {lab: i for i, lab in enumerate(labels)}
    wanted: list[str] = []
    for item in m["residues"].split(","):
        item = item.strip()
        r = re.fullmatch(r"(-?\d+[A-Za-z]?)(?:-(-?\d+[A-Za-z]?))?", item)
        if not r:
            raise DesignError(f"--motif {spec!r}: residue item {item!r} is not N or N-M")
        if r[2] is None:
            wanted.append(r[1])
            continue
        lo, hi = (int(re.match(r"-?\d+", x)[0]) for x in (r[1], r[2]))
        if hi < lo:
            raise DesignError(f"--motif {spec!r}: range {item!r} runs backwards")
        wanted.extend(str(n) for n in range(lo, hi + 1))
    for lab in wanted:
        if lab not in index_of:
            raise DesignError(f"--motif {spec!r}: residue {lab} is not in {path} chain {chain.chain_id!r} "
                              f"(its residues run {labels[0]}..{labels[-1]}, {len(labels)} in all)")
    if len(set(wanted)) != len(wanted):
        raise DesignError(f"--motif {spec!r}: a residue is listed twice")
    idx = np.array([index_of[lab] for lab in wanted])
    backbone = np.asarray(chain.backbone, np.float32)[idx]
    missing = ~np.isfinite(backbone).all((-1, -2))
    if missing.any():
        raise DesignError(f"--motif {spec!r}: residue {wanted[int(np.argmax(missing))]} of {path} chain "
                          f"{chain.chain_id!r} lacks an N, CA or C atom")
    if position < 1 or position + len(wanted) - 1 > length:
        raise DesignError(f"--motif {spec!r}: {len(wanted)} residues at position {position} do not fit --length {length}")
    return Motif(spec, str(path), chain.chain_id, m["residues"], tuple(wanted), position, backbone,
                 "".join(chain.sequence[i] for i in idx))


def parse_function_prompt(spec: str, length: int) -> tuple[list[str], int, int]:
    """'KEYWORDS:START-END' -> (labels, start, end): labels comma-separated keywords of the
    vocabulary or label ids (InterPro-style), over residues START..END (1-based, inclusive)."""
    text, sep, rng = spec.rpartition(":")
    r = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", rng)
    if not sep or not r:
        raise DesignError(f"--function-prompt {spec!r}: expected 'KEYWORDS:START-END', e.g. 'zinc finger,dna binding:10-40'")
    start, end = int(r[1]), int(r[2])
    labels = [w.strip() for w in text.split(",") if w.strip()]
    if not labels:
        raise DesignError(f"--function-prompt {spec!r}: no keyword before the ':'")
    if not 1 <= start <= end <= length:
        raise DesignError(f"--function-prompt {spec!r}: range {start}-{end} does not fit --length {length}")
    return labels, start, end


def parse_plan(tracks: str, num_steps: str) -> list[tuple[str, int]]:
    """'ss8,structure,sequence' and '8' (every track) or '8,16,16' (one per track) -> the plan."""
    names = [t.strip() for t in tracks.split(",") if t.strip()]
    if not names:
        raise DesignError("--tracks: name at least one track")
    for t in names:
        if t not in engine.TRACKS:
            raise DesignError(f"--tracks: unknown track {t!r}; choose from {', '.join(engine.TRACKS)}")
    if len(set(names)) != len(names):
        raise DesignError(f"--tracks {tracks!r}: a track is named twice")
    try:
        steps = [int(s) for s in str(num_steps).split(",")]
    except ValueError:
        raise DesignError(f"--num-steps {num_steps!r}: expected a number or one number per track, comma-separated") from None
    if len(steps) == 1:
        steps = steps * len(names)
    if len(steps) != len(names) or min(steps) < 1:
        raise DesignError(f"--num-steps {num_steps!r}: give one value >= 1, or one per track of --tracks ({len(names)})")
    return list(zip(names, steps))


def build_prompt(
    length: int,
    *,
    sequence: str | None = None,
    sequence_offset: int = 0,
    ss8: str | None = None,
    ss8_offset: int = 0,
    motifs: Sequence[str] = (),
    motif_sequence: bool = False,
    function_prompts: Sequence[str] = (),
    function_vocab: str | Path | None = None,
    generate_function: bool = False,
) -> DesignPrompt:
    """The prompt of a design of `length` residues; every problem is a DesignError (or
    FileNotFoundError / StructureError) naming the option at fault."""
    if length < 1:
        raise DesignError(f"--length must be >= 1, got {length}")
    seq = list(_place(sequence or "", sequence_offset, length, FOLD_LETTERS, "--sequence-prompt"))
    ss = _place(ss8 or "", ss8_offset, length, SS8_LETTERS, "--ss8-prompt")
    backbone = np.full((length, 3, 3), np.nan, np.float32)
    placed: list[Motif] = []
    owner: dict[int, str] = {}
    for spec in motifs:
        motif = parse_motif(spec, length)
        for k, pos in enumerate(motif.positions):
            if pos in owner:
                raise DesignError(f"--motif {spec!r}: residue {pos} is already taken by --motif {owner[pos]!r}")
            owner[pos] = spec
            if motif_sequence:
                letter = motif.sequence[k]
                if seq[pos - 1] not in (T.MASK_CHAR, letter):
                    raise DesignError(f"--motif {spec!r} puts {letter!r} at residue {pos}, where --sequence-prompt has {seq[pos - 1]!r}")
                seq[pos - 1] = letter
        backbone[motif.position - 1 : motif.position - 1 + len(motif.residues)] = motif.backbone_Nx3x3
        placed.append(motif)
    function_tokens = None
    prompted = np.zeros(length, bool)
    fprompts = []
    if function_prompts:
        if function_vocab is None:
            raise DesignError("--function-prompt needs --function-vocab DIR (the function vocabulary the model was trained with)")
        parsed = [parse_function_prompt(s, length) for s in function_prompts]
        vocab = load_function_vocab_dir(function_vocab)
        annotations = []
        for spec, (labels, start, end) in zip(function_prompts, parsed):
            annotations += [FunctionAnnotation(label, start, end) for label in labels]
            prompted[start - 1 : end] = True
            fprompts.append({"spec": spec, "labels": labels, "start": start, "end": end})
        try:
            function_tokens = tokenize_function_annotations(vocab, annotations, length)
        except ValueError as e:
            raise DesignError(f"--function-prompt: {e} ({function_vocab})") from None
        if generate_function:
            # The function track is generated: only the prompted ranges are given, the rest masked
            # (otherwise <none>, "no function here", the reference's encoding of annotations).
            function_tokens = np.where(prompted[:, None], function_tokens, T.FUNCTION_PAD).astype(np.int32)
    elif function_vocab is not None and not Path(function_vocab).is_dir():
        raise FileNotFoundError(f"--function-vocab {function_vocab}: no such directory")
    return DesignPrompt(length, "".join(seq), ss, backbone, function_tokens, prompted, tuple(placed), tuple(fprompts))


# --- generation -------------------------------------------------------------------------------------


def design_inputs(prompt: DesignPrompt, num_samples: int) -> dict[str, np.ndarray]:
    """`num_samples` identical rows of the engine's inputs: free residues hold each track's mask."""
    x = T.encode_protein(prompt.sequence, ss8=prompt.ss8, function_tokens=prompt.function_Nx8,
                         coords=prompt.backbone_Nx3x3)
    keep = ("sequence_tokens", "structure_tokens", "ss8_tokens", "sasa_tokens", "function_tokens",
            "structure_coords", "per_res_plddt", "average_plddt")
    return stack_proteins([{k: x[k] for k in keep}] * num_samples)


def _masked_count(x: dict[str, np.ndarray], track: str) -> int:
    spec = engine.TRACKS[track]
    m = x[spec.key] == spec.mask
    m = m.all(-1) if m.ndim == 3 else m
    return int(m[:, 1:-1].sum())


def design(
    cfg: Any,
    params: Any,
    prompt: DesignPrompt,
    plan: Sequence[tuple[str, int]],
    *,
    num_samples: int = 1,
    seed: int = 0,
    **options: Any,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """(the final inputs with every planned track filled, the tracks skipped because the prompt
    left nothing of them masked). Track i of the plan draws with seed + i (as `generate_chain`);
    within a track, sample r's draws depend on the seed and r only. The sequence track never
    samples the non-standard letters (X, B, U, Z, O, '.', '-')."""
    if num_samples < 1:
        raise DesignError(f"--num-samples must be >= 1, got {num_samples}")
    x = design_inputs(prompt, num_samples)
    skipped = []
    for i, (track, num_steps) in enumerate(plan):
        if _masked_count(x, track) == 0:
            skipped.append(track)
            continue
        never = NONSTANDARD_SEQUENCE_IDS if track == "sequence" else ()
        x = engine.generate(cfg, params, x, track, num_steps, seed=seed + i, never_sample=never,
                            source=f"design ({track})", **options)
    return x, skipped


def prompts_honoured(prompt: DesignPrompt, row: dict[str, np.ndarray]) -> dict[str, bool]:
    """Per prompt kind given: whether every prompted residue of this sample holds the prompt."""
    out = {}
    seq = T.decode_sequence(row["sequence_tokens"])
    given = [i for i, c in enumerate(prompt.sequence) if c != T.MASK_CHAR]
    if given:
        out["sequence"] = all(seq[i] == prompt.sequence[i] for i in given)
    given = [i for i, c in enumerate(prompt.ss8) if c != T.MASK_CHAR]
    if given:
        want = T.encode_ss8(prompt.ss8, add_special_tokens=False)
        out["ss8"] = bool(np.all(row["ss8_tokens"][1:-1][given] == want[given]))
    if prompt.motifs:
        # Coordinates are an input the engine never writes; checked all the same.
        have = np.isfinite(prompt.backbone_Nx3x3).all((-1, -2))
        out["motif_coordinates"] = bool(np.array_equal(row["structure_coords"][1:-1][have], prompt.backbone_Nx3x3[have]))
    if prompt.function_Nx8 is not None:
        p = prompt.function_prompted_N
        out["function"] = bool(np.array_equal(row["function_tokens"][1:-1][p], prompt.function_Nx8[p]))
    return out


# --- the verb -----------------------------------------------------------------------------------------


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="esm3-jax checkpoint (from `convert` or training)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--inputs", help="batch form: .npz in the `forward` verb's format, the positions to generate holding the track's mask id")
    mode.add_argument("--length", type=int, help="free design: the number of residues to design")
    batch = p.add_argument_group("batch form (--inputs)")
    batch.add_argument("--track", help=f"the track to generate: {', '.join(engine.TRACKS)}")
    batch.add_argument("--out", help="output .npz: the input arrays with the track filled")
    free = p.add_argument_group("free design (--length)")
    free.add_argument("--out-dir", help="folder for design.fasta, sample_I.pdb (with --decoder) and summary.json")
    free.add_argument("--sequence-prompt", default=None, help="amino acids, '_' for free residues (at most --length letters)")
    free.add_argument("--sequence-offset", type=int, default=0, help="the sequence prompt starts at residue OFFSET+1 (default 0)")
    free.add_argument("--ss8-prompt", default=None, help="SS8 letters GHITEBSC ('L' = C), '_' for free residues")
    free.add_argument("--ss8-offset", type=int, default=0, help="the SS8 prompt starts at residue OFFSET+1 (default 0)")
    free.add_argument("--motif", action="append", default=[], metavar="FILE:CHAIN:RESIDUES@POSITION",
                      help="backbone coordinates of author residues RESIDUES ('10-25', '5,7,10-12') of CHAIN "
                           "(empty: the first) placed from design residue POSITION on; repeatable")
    free.add_argument("--motif-sequence", action="store_true", help="also prompt the motifs' amino acids")
    free.add_argument("--function-prompt", action="append", default=[], metavar="KEYWORDS:START-END",
                      help="function keywords (comma-separated, or label ids) over residues START-END; repeatable; needs --function-vocab")
    free.add_argument("--function-vocab", default=None, help="function vocabulary folder (`build-function-vocab`, or the release's files)")
    free.add_argument("--tracks", default=DEFAULT_TRACKS, help=f"tracks to generate, in order (chain of thought; default {DEFAULT_TRACKS})")
    free.add_argument("--num-samples", type=int, default=1, help="designs, generated in one batch (sample i depends on the seed and i)")
    free.add_argument("--decoder", default=None, help="structure-decoder checkpoint: write one PDB per sample")
    p.add_argument("--num-steps", default=None, help="forward passes per track: one number, or (free design) one per track of --tracks, "
                                                     "comma-separated; capped at the masked count (free design default 8)")
    engine.add_sampling_arguments(p)


_FREE_ONLY = ("out_dir", "sequence_prompt", "ss8_prompt", "function_vocab", "decoder")


def _batch_main(args: argparse.Namespace) -> int:
    for opt in ("track", "out", "num_steps"):
        if getattr(args, opt) is None:
            raise DesignError(f"generate --inputs needs --{opt.replace('_', '-')}")
    given = [o for o in _FREE_ONLY if getattr(args, o) is not None] + [o for o in ("motif", "function_prompt") if getattr(args, o)]
    if given:
        raise DesignError(f"--{given[0].replace('_', '-')} is an option of free design (--length), not of --inputs")
    try:
        args.num_steps = int(args.num_steps)
    except ValueError:
        raise DesignError(f"--num-steps {args.num_steps!r}: generate --inputs takes one number") from None
    return engine.cli_main(args)


def _design_main(args: argparse.Namespace) -> int:
    if args.out_dir is None:
        raise DesignError("generate --length needs --out-dir")
    if args.track is not None or args.out is not None:
        raise DesignError("--track and --out belong to generate --inputs; free design takes --tracks and --out-dir")
    plan = parse_plan(args.tracks, args.num_steps if args.num_steps is not None else "8")
    tracks = [t for t, _ in plan]
    prompt = build_prompt(args.length, sequence=args.sequence_prompt, sequence_offset=args.sequence_offset,
                          ss8=args.ss8_prompt, ss8_offset=args.ss8_offset, motifs=args.motif,
                          motif_sequence=args.motif_sequence, function_prompts=args.function_prompt,
                          function_vocab=args.function_vocab, generate_function="function" in tracks)
    if "sequence" not in tracks and T.MASK_CHAR in prompt.sequence:
        raise DesignError(f"--tracks {args.tracks!r} leaves residues without an amino acid: add 'sequence' (or prompt every residue)")
    if args.decoder is not None and "structure" not in tracks:
        raise DesignError(f"--decoder needs 'structure' in --tracks (got {args.tracks!r}): the PDBs are decoded from structure tokens")
    if args.num_samples < 1:
        raise DesignError(f"--num-samples must be >= 1, got {args.num_samples}")
    tokenizer = StructureTokenizer.load(decoder_dir=args.decoder) if args.decoder else None
    cfg, params = load_esm3(args.checkpoint, args.dtype)
    started = time.perf_counter()
    out, skipped = design(cfg, params, prompt, plan, num_samples=args.num_samples, seed=args.seed,
                          strategy=args.strategy, schedule=args.schedule, temperature=args.temperature,
                          temperature_annealing=not args.no_temperature_annealing, top_p=args.top_p,
                          batch_size=args.batch_size)
    elapsed = time.perf_counter() - started
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ss8_known = "ss8" in tracks or any(c != T.MASK_CHAR for c in prompt.ss8)
    samples, fasta = [], []
    for r in range(args.num_samples):
        row = {k: v[r] for k, v in out.items()}
        name = f"sample_{r}"
        seq = T.decode_sequence(row["sequence_tokens"])
        entry: dict[str, Any] = {"name": name, "sequence": seq, "ss8": T.decode_ss8(row["ss8_tokens"]) if ss8_known else None}
        header = f">{name} length={len(seq)}"
        if tokenizer is not None:
            codes = row["structure_tokens"][1:-1].astype(np.int32)
            dec = tokenizer.decode(codes, sequence=seq if tokenizer.decoder_config.sequence_conditioning else None)
            pdb = write_structure(out_dir / f"{name}.pdb", decoded_chain(dec, seq))
            entry.update(pdb=pdb.name, ptm=dec["ptm"], mean_plddt=float(np.mean(dec["plddt"])))
            header += f" pTM={dec['ptm']:.4f} mean_pLDDT={entry['mean_plddt']:.4f}"
            if prompt.motifs:
                # How far the decoded backbone is from the motif it was conditioned on, over all
                # motifs together (N, CA, C after one superposition), in Å.
                have = np.isfinite(prompt.backbone_Nx3x3).all((-1, -2))
                entry["motif_backbone_rmsd"] = geometry.rmsd(dec["backbone"][have].reshape(-1, 3),
                                                             prompt.backbone_Nx3x3[have].reshape(-1, 3))
        entry["prompts_honoured"] = prompts_honoured(prompt, row)
        samples.append(entry)
        fasta.append(f"{header}\n{seq}\n")
    (out_dir / "design.fasta").write_text("".join(fasta))
    summary = {
        "checkpoint": str(args.checkpoint), "decoder": args.decoder, "length": args.length,
        "num_samples": args.num_samples, "seed": args.seed,
        "plan": [{"track": t, "num_steps": n, "skipped": t in skipped} for t, n in plan],
        "sampling": {"strategy": args.strategy, "schedule": args.schedule, "temperature": args.temperature,
                     "temperature_annealing": not args.no_temperature_annealing, "top_p": args.top_p},
        "prompts": {
            "sequence": prompt.sequence if T.MASK_CHAR * args.length != prompt.sequence else None,
            "ss8": prompt.ss8 if T.MASK_CHAR * args.length != prompt.ss8 else None,
            "motifs": [{"spec": m.spec, "file": m.path, "chain": m.chain_id, "residues": m.selection,
                        "positions": [m.position, m.position + len(m.residues) - 1], "sequence": m.sequence}
                       for m in prompt.motifs],
            "function": list(prompt.function_prompts),
        },
        "samples": samples,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for t in skipped:
        print(f"  {t}: every residue prompted, nothing to generate")
    for e in samples:
        line = f"{e['name']}\t{e['sequence']}"
        if "ptm" in e:
            line += f"\tpTM={e['ptm']:.4f}\tmean_pLDDT={e['mean_plddt']:.4f}"
        if "motif_backbone_rmsd" in e:
            line += f"\tmotif_RMSD={e['motif_backbone_rmsd']:.2f}"
        print(line + ("" if all(e["prompts_honoured"].values()) else "\tPROMPT NOT HONOURED"))
    print(f"generate: {args.num_samples} design(s) of {args.length} residues ({' -> '.join(f'{t} {n}' for t, n in plan)} steps) "
          f"in {elapsed:.1f} s (compilation included) -> {out_dir}")
    return 0


def cli_main(args: argparse.Namespace) -> int:
    return _batch_main(args) if args.inputs is not None else _design_main(args)


# cli.py: "generate" -> GENERATE_VERB (both forms of the verb)
GENERATE_VERB = types.SimpleNamespace(add_cli_arguments=add_cli_arguments, cli_main=cli_main)
