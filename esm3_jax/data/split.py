"""`esm3-jax split`: FASTA / jsonl inputs -> train / valid / test inputs that share no sequence cluster.

A random split of protein chains leaks: near-identical sequences (orthologs, point mutants, the same
protein in several PDB entries) land on both sides, and the validation loss measures memorisation. Here
the inputs' sequences are clustered with MMseqs2 (`mmseqs easy-cluster` at `--identity`, default 0.3, and
`--coverage`), and whole clusters are assigned to a split by a hash of the cluster representative's id
with `--seed`, against `--fractions` (of clusters). Same inputs, settings and MMseqs2 version -> same split.

The output folder holds, per split, a copy of every input holding only that split's entries (FASTA
records and jsonl lines verbatim, uncompressed), so each split is then preprocessed on its own:

    train/<input name> valid/<input name> test/<input name>
    clusters.tsv   representative id, member id (MMseqs2's cluster table, with the entries' ids)
    split.json     the clustering (tool and version, identity, coverage, seed, fractions), the counts
                   of sequences and clusters per split, the entries skipped (no usable sequence)

Structure folders are not split here (split their chains' sequences, then select files by id).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from esm3_jax.data import sources as src

SPLITS = ("train", "valid", "test")
SPLIT_JSON = "split.json"
CLUSTERS_TSV = "clusters.tsv"
INSTALL_HINT = (
    "mmseqs (MMseqs2) not found on PATH; install it (Debian/Ubuntu: apt-get install -y mmseqs2; "
    "conda: conda install -c bioconda mmseqs2) or put its binary on PATH"
)


class MmseqsUnavailable(FileNotFoundError):
    """The mmseqs binary is not on PATH."""


def mmseqs_binary() -> str:
    exe = shutil.which("mmseqs")
    if exe is None:
        raise MmseqsUnavailable(INSTALL_HINT)
    return exe


def mmseqs_version(exe: str) -> str:
    out = subprocess.run([exe, "version"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


def assign(representative_id: str, seed: int, fractions: tuple[float, float, float]) -> str:
    """The split of a cluster: a uniform number in [0, 1) from sha256(seed, id), cut at the fractions."""
    digest = hashlib.sha256(f"{seed}\0{representative_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    edge = 0.0
    for name, f in zip(SPLITS, fractions):
        edge += f
        if u < edge:
            return name
    return SPLITS[-1]


def _read_entries(inputs: list[str]) -> tuple[list[tuple[int, str, str, str]], list[dict]]:
    """(input index, protein id, sequence, verbatim text) per usable entry; and the skipped ones."""
    kept, skipped = [], []
    for i, path in enumerate(inputs):
        kind = src.input_kind(path)
        if kind not in ("fasta", "jsonl"):
            raise ValueError(f"{path}: split takes FASTA and jsonl inputs, not {kind}")
        for entry in src.iter_entries(path, kind):
            (item,) = src.parse_entry(entry, src.ParseOptions())
            if isinstance(item, src.SourceError) or not item.sequence:
                reason = item.reason if isinstance(item, src.SourceError) else "empty"
                skipped.append({"source": entry.location, "reason": reason})
                continue
            if kind == "fasta":
                header, seq = entry.data
                text = f">{header}\n{seq}\n"
            else:
                text = entry.data if entry.data.endswith("\n") else entry.data + "\n"
            kept.append((i, item.id, item.sequence, text))
    return kept, skipped


def _cluster(exe: str, sequences: list[str], identity: float, coverage: float, threads: int) -> list[int]:
    """Representative index of every sequence (MMseqs2 easy-cluster)."""
    with tempfile.TemporaryDirectory(prefix="esm3-split-") as tmp:
        fasta = Path(tmp) / "in.fasta"
        with open(fasta, "w") as f:
            for k, seq in enumerate(sequences):
                f.write(f">{k}\n{seq}\n")  # indices as names: the inputs' ids need not be unique
        prefix = Path(tmp) / "clu"
        cmd = [
            exe, "easy-cluster", str(fasta), str(prefix), str(Path(tmp) / "work"),
            "--min-seq-id", str(identity), "-c", str(coverage), "--threads", str(threads), "-v", "1",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"mmseqs easy-cluster failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        rep = [-1] * len(sequences)
        for line in (Path(tmp) / "clu_cluster.tsv").read_text().splitlines():
            r, m = line.split("\t")
            rep[int(m)] = int(r)
    if -1 in rep:
        raise RuntimeError(f"mmseqs left sequence {rep.index(-1)} out of every cluster")
    return rep


def run(
    inputs: list[str],
    out_dir: str | Path,
    *,
    identity: float = 0.3,
    coverage: float = 0.8,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
    threads: int = 1,
) -> dict:
    """Cluster the inputs' sequences and write the per-split inputs; returns split.json's content."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"--fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    if not 0.0 <= identity <= 1.0 or not 0.0 <= coverage <= 1.0:
        raise ValueError(f"--identity and --coverage must be in [0, 1], got {identity}, {coverage}")
    exe = mmseqs_binary()  # before reading anything
    entries, skipped = _read_entries(inputs)
    if not entries:
        raise ValueError(f"no usable sequence in {', '.join(inputs)}")
    rep = _cluster(exe, [e[2] for e in entries], identity, coverage, threads)
    split_of = [assign(entries[r][1], seed, fractions) for r in rep]

    out = Path(out_dir)
    handles = {}
    try:
        for name in SPLITS:
            (out / name).mkdir(parents=True, exist_ok=True)
            for i, path in enumerate(inputs):
                fname = Path(path).name.removesuffix(".gz")
                handles[name, i] = open(out / name / fname, "w")
        for (i, _, _, text), name in zip(entries, split_of):
            handles[name, i].write(text)
    finally:
        for h in handles.values():
            h.close()
    with open(out / CLUSTERS_TSV, "w") as f:
        for k, r in enumerate(rep):
            f.write(f"{entries[r][1]}\t{entries[k][1]}\n")

    n_seq = collections.Counter(split_of)
    n_clu = collections.Counter(split_of[r] for r in set(rep))
    summary = {
        "tool": "mmseqs easy-cluster",
        "tool_version": mmseqs_version(exe),
        "identity": identity,
        "coverage": coverage,
        "seed": seed,
        "fractions": dict(zip(SPLITS, fractions)),
        "n_sequences": len(entries),
        "n_clusters": len(set(rep)),
        "splits": {s: {"n_sequences": n_seq[s], "n_clusters": n_clu[s]} for s in SPLITS},
        "n_skipped": len(skipped),
        "skipped": skipped,
        "inputs": list(inputs),
    }
    (out / SPLIT_JSON).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# --- CLI ------------------------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="FASTA / jsonl files (.gz ok)")
    parser.add_argument("-o", "--out", required=True, help="output folder: train/ valid/ test/, split.json")
    parser.add_argument("--identity", type=float, default=0.3, help="MMseqs2 --min-seq-id of a cluster (0.3)")
    parser.add_argument("--coverage", type=float, default=0.8, help="MMseqs2 -c, alignment coverage (0.8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cluster -> split hash")
    parser.add_argument(
        "--fractions", type=float, nargs=3, default=(0.9, 0.05, 0.05), metavar=("TRAIN", "VALID", "TEST"),
        help="fractions of clusters per split (0.9 0.05 0.05)",
    )  # fmt: skip
    parser.add_argument("-j", "--threads", type=int, default=os.cpu_count() or 1, help="MMseqs2 threads")


def cli_main(args: argparse.Namespace) -> int:
    s = run(
        args.inputs, args.out, identity=args.identity, coverage=args.coverage, seed=args.seed,
        fractions=tuple(args.fractions), threads=args.threads,
    )  # fmt: skip
    parts = ", ".join(f"{k} {v['n_sequences']} ({v['n_clusters']} clusters)" for k, v in s["splits"].items())
    n = f"{s['n_sequences']} sequences in {s['n_clusters']} clusters"
    print(f"{n}: {parts}; {s['n_skipped']} skipped -> {args.out}")
    return 0
