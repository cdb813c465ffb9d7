"""`esm3-jax preprocess`: raw proteins -> ArrayRecord shards of tokenized `ProteinRecord`s.

Inputs (any mix, in the order given): FASTA (sequence only), jsonl rows of sequence + DSSP string
(sequence + SS8, optional function labels), per-residue label files (sequence + residue annotations),
and PDB/mmCIF files or folders (every structure track). See sources.py for the formats.

The output folder holds:

    shard-00000.array_record ...  the records; shard k holds the proteins of input entries
                                  [k * records_per_shard, (k + 1) * records_per_shard)
    manifest.json                 counts (records, tokens, rejects by reason), which tracks the records
                                  carry, a length histogram, per-input counts, shard checksums; for
                                  inputs written by `esm3-jax split`, "clustering": the split's name
                                  and its split.json (MMseqs2 version, identity, counts per split)
    rejects.jsonl                 one line per skipped protein: source, id, reason, detail. Reasons:
                                  unparsable, empty, too short, unknown letters,
                                  too many unknown residues, length mismatch,
                                  no backbone, no protein chains, bad coordinates, bad function label,
                                  structure features failed, truncated (a compressed input that
                                  ends early: the part it held up to there is kept)
    progress.jsonl                the run's settings, then one line per finished shard (for resume)

Why shards are cut by *input entry* rather than by kept record: a shard's content then depends only
on its own slice of the input, so workers never wait on each other, any worker count gives
byte-identical shards, and a resumed run knows which shard an entry belongs to without re-parsing
everything before it. (A structure file is one entry; all its chains go to its shard.)

Resume: each shard is written to a hidden temporary name and renamed when complete; its sha256 is
then appended to progress.jsonl. A rerun with the same settings skips every shard whose file is
present with that checksum and redoes the rest.

The same run as an Apache Beam pipeline (`--runner`, for clusters) is preprocess_beam.py; it calls
this module's per-entry (`process_entry`/`outcome`), per-shard (`write_shard_file`, `shard_row`) and
summary (`summarize`) code, so both paths write the same bytes. The verb is preprocess_cli.py.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from esm3_jax import tokens as T
from esm3_jax.data import records
from esm3_jax.data import sources as src
from esm3_jax.data import tokenize
from esm3_jax.data.tokenize import Tokenizers, to_record

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
PROGRESS = "progress.jsonl"
SHARD_PREFIX = "shard"
MANIFEST_VERSION = 1

# Track names as the manifest reports them (the ProteinRecord fields other than id/source).
TRACKS = tuple(f.name for f in dataclasses.fields(records.ProteinRecord) if f.name not in ("id", "source"))
# Length histogram bins: powers of two, so a glance tells how much a crop length would cut.
_HIST_EDGES = (0, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 1 << 62)

class PreprocessError(ValueError):
    """The run as a whole cannot proceed (every record rejected, an output folder from other settings)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides the output bytes; a resumed run must match it exactly."""

    inputs: tuple[tuple[str, str], ...]  # (path, kind) in order
    records_per_shard: int = 10_000
    # 8 residues: shorter chains (peptide ligands, fragments a structure file resolves only in part) hold
    # too little to learn a fold or a language from, and in an mmCIF a 1-3 residue "chain" is usually a
    # modified residue or capping group. 8 still keeps short real peptides such as hormones; raise it
    # (ESM-style corpora often use 30-50) or lower it with --min-length.
    min_length: int = 8
    # Above half X the sequence track is mostly <X>: the chain teaches the model to predict X. A chain
    # with only a few unresolved residues stays.
    max_unknown_fraction: float = 0.5
    function_vocab: str | None = None  # directory of save_function_vocab files
    structure_encoder: str | None = None
    parse: src.ParseOptions = src.ParseOptions()

    def validate(self) -> None:
        if not self.inputs:
            raise ValueError("no inputs to preprocess")
        if self.records_per_shard <= 0:
            raise ValueError(f"records per shard must be positive, got {self.records_per_shard}")
        if self.min_length < 1:
            raise ValueError(f"min length must be at least 1, got {self.min_length}")
        if not 0.0 <= self.max_unknown_fraction <= 1.0:
            raise ValueError(f"max unknown fraction must be in [0, 1], got {self.max_unknown_fraction}")
        if self.parse.function_from_sccs and self.function_vocab is None:
            raise ValueError("--function-from-sccs needs --function-vocab (the labels must be in a vocabulary)")
        if self.parse.scope_domains_path is not None and self.function_vocab is None:
            raise ValueError("--scope-des needs --function-vocab (the SCOPe families must be in a vocabulary)")
        if self.parse.plddt not in ("auto", "bfactor", "one"):
            raise ValueError(f"--plddt must be auto, bfactor or one, got {self.parse.plddt!r}")
        if not 4 <= self.parse.ppi_annotation_id < T.RESIDUE_VOCAB_SIZE:
            raise ValueError(
                f"--ppi-annotation-id must be in [4, {T.RESIDUE_VOCAB_SIZE}), got {self.parse.ppi_annotation_id}"
            )

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# --- one shard ------------------------------------------------------------------------------------------


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}-{index:05d}{records.SHARD_SUFFIX}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _shard_intact(path: Path, sha256: str) -> bool:
    return path.is_file() and _sha256(path) == sha256


def _length_bin(n: int) -> str:
    i = int(np.searchsorted(_HIST_EDGES, n, side="right")) - 1
    hi = _HIST_EDGES[i + 1]
    return f"{_HIST_EDGES[i]}+" if hi == _HIST_EDGES[-1] else f"{_HIST_EDGES[i]}-{hi - 1}"


def _write_shard(path: Path, payloads: Sequence[bytes]) -> None:
    """Write under a hidden temporary name, then rename: a crash never leaves a partial shard."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = path.with_name(f".{path.name}.partial")
    writer = ArrayRecordWriter(str(tmp), records.ARRAY_RECORD_OPTIONS)
    try:
        for p in payloads:
            writer.write(p)
    finally:
        writer.close()
    os.replace(tmp, path)


class Kept(NamedTuple):
    """One protein that became a record: its bytes and what the manifest counts of it."""

    input_index: int
    payload: bytes
    n_residues: int
    tracks: tuple[str, ...]


class Rejected(NamedTuple):
    input_index: int
    reject: dict  # source, id, reason, detail (one line of rejects.jsonl)


Outcome = Kept | Rejected


def process_entry(input_index: int, entry: src.Entry, settings: Settings, tok: Tokenizers) -> list[Outcome]:
    """Parse and tokenize one input entry: one outcome per protein it holds, in file order."""
    return [outcome(input_index, entry.location, item, settings, tok) for item in src.parse_entry(entry, settings.parse)]


def outcome(
    input_index: int, location: str, item: src.RawProtein | src.SourceError, settings: Settings, tok: Tokenizers
) -> Outcome:
    """One parsed protein (or the error that stopped its parsing) -> its record bytes, or its reject line."""
    try:
        if isinstance(item, src.SourceError):
            raise item
        record = to_record(item, tok, settings.min_length, settings.max_unknown_fraction)
    except src.SourceError as e:
        rid = item.id if isinstance(item, src.RawProtein) else item.record_id
        return Rejected(input_index, {"source": location, "id": rid, "reason": e.reason, "detail": e.detail})
    return Kept(input_index, records.serialize(record), len(record), tuple(t for t in TRACKS if record.has(t)))


def shard_row(index: int, n_entries: int, outcomes: Iterable[Outcome], sha256: str, extra: dict | None = None) -> dict:
    """The progress line of a written shard (counts, rejects, checksum); `outcomes` in shard order."""
    rejects: list[dict] = []
    lengths: collections.Counter = collections.Counter()
    tracks: collections.Counter = collections.Counter()
    per_input = collections.defaultdict(lambda: [0, 0])  # input index -> [kept, rejected]
    n_records = n_residues = 0
    for o in outcomes:
        if isinstance(o, Rejected):
            rejects.append(o.reject)
            per_input[o.input_index][1] += 1
            continue
        n_records += 1
        per_input[o.input_index][0] += 1
        n_residues += o.n_residues
        lengths[_length_bin(o.n_residues)] += 1
        tracks.update(o.tracks)
    row = {
        "shard": index,
        "file": shard_name(index),
        "sha256": sha256,
        "n_entries": n_entries,
        "n_records": n_records,
        "n_residues": n_residues,
        "tracks": dict(tracks),
        "lengths": dict(lengths),
        "per_input": {str(k): v for k, v in sorted(per_input.items())},
        "rejects": rejects,
    }
    if extra:
        row.update(extra)
    return row


def write_shard_file(path: Path, outcomes: Sequence[Outcome]) -> str:
    """Write the kept records of `outcomes` as the shard at `path`; returns its sha256."""
    _write_shard(path, [o.payload for o in outcomes if isinstance(o, Kept)])
    return _sha256(path)


def process_shard(
    out_dir: str, index: int, entries: Sequence[tuple[int, src.Entry]], settings: Settings, tok: Tokenizers
) -> dict:
    """Parse, tokenize and write one shard; return its progress line (counts, rejects, checksum)."""
    outcomes = [o for input_index, entry in entries for o in process_entry(input_index, entry, settings, tok)]
    sha256 = write_shard_file(Path(out_dir) / shard_name(index), outcomes)
    return shard_row(index, len(entries), outcomes, sha256)


# --- tokenizers, loaded once per worker (data/tokenize.py) --------------------------------------------------


def load_tokenizers(settings: Settings) -> Tokenizers:
    return tokenize.load_tokenizers(settings.function_vocab, settings.structure_encoder)


# A worker process's tokenizers, loaded once by `_init_worker` (the function vocabulary alone can be
# tens of MB; shipping it with every shard would dominate the work).
_WORKER_TOKENIZERS: Tokenizers | None = None


def _init_worker(settings: Settings) -> None:
    global _WORKER_TOKENIZERS
    _WORKER_TOKENIZERS = load_tokenizers(settings)


def _worker_shard(out_dir: str, index: int, entries: Sequence[tuple[int, src.Entry]], settings: Settings) -> dict:
    return process_shard(out_dir, index, entries, settings, _WORKER_TOKENIZERS)


# --- the run ------------------------------------------------------------------------------------------------


def _iter_inputs(settings: Settings) -> Iterator[tuple[int, src.Entry]]:
    for i, (path, kind) in enumerate(settings.inputs):
        for entry in src.iter_entries(path, kind):
            yield i, entry


def count_entries(settings: Settings) -> int:
    """How many entries the inputs hold (a quick scan, for the progress bar's total)."""
    n = 0
    for path, kind in settings.inputs:
        if kind == "structure_dir":
            n += len(src.structure_files(path))
        elif kind == "structure":
            n += 1
        else:
            with src.open_text(path) as f:
                lines = iter(f)
                while True:  # line by line, so that a truncated .gz still counts what it holds
                    try:
                        line = next(lines)
                    except (StopIteration, *src.STREAM_ERRORS):
                        break
                    n += bool(line.strip()) if kind == "jsonl" else line.startswith(">")
    return n


def _input_fingerprint(settings: Settings) -> list:
    """Sizes of the inputs, so that a resumed run notices an input that changed under it."""
    fp = []
    for path, kind in settings.inputs:
        files = src.structure_files(path) if kind == "structure_dir" else [Path(path)]
        fp.append([path, len(files), sum(f.stat().st_size for f in files)])
    return fp


def _read_progress(path: Path, header: dict, overwrite: bool) -> dict[int, dict]:
    """Finished shards recorded by an earlier run with the same settings (shard index -> line)."""
    if not path.exists():
        return {}
    return earlier_progress(path.read_text().splitlines(), header, overwrite, str(path.parent))


def earlier_progress(lines: list[str], header: dict, overwrite: bool, where: str,
                     more_lines: Iterable[str] = ()) -> dict[int, dict]:
    """Shard index -> progress line of an earlier run's progress file (`lines`: its header first, then
    one line per finished shard; `more_lines`: further shard lines, read only when the header matches).
    Both the local and the Beam path read their earlier runs through this one check."""
    try:
        earlier = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        earlier = {}
    if earlier != header:
        if overwrite:
            return {}
        raise PreprocessError(
            f"{where} holds a run with different inputs or settings; use a new output folder or --overwrite"
        )
    done = {}
    for line in itertools.chain(lines[1:], more_lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a run killed mid-write
        done[row["shard"]] = row
    return done


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def run(
    settings: Settings, out_dir: str | Path, *, workers: int = 1, progress: bool = True, overwrite: bool = False
) -> dict:
    """Preprocess `settings.inputs` into `out_dir`; returns the manifest. Resumes an earlier run."""
    settings.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = {"settings": settings.to_json(), "inputs": _input_fingerprint(settings)}
    progress_path = out / PROGRESS
    done = _read_progress(progress_path, header, overwrite)
    # Keep only shards whose bytes are still what the progress line says.
    done = {i: row for i, row in done.items() if _shard_intact(out / row["file"], row["sha256"])}
    if overwrite or not progress_path.exists():
        for stale in out.glob(f"{SHARD_PREFIX}-*{records.SHARD_SUFFIX}"):
            stale.unlink()
        done = {}
    with open(progress_path, "w") as f:  # rewrite: header + the shards that are verifiably done
        f.write(json.dumps(header) + "\n")
        for i in sorted(done):
            f.write(json.dumps(done[i]) + "\n")

    from tqdm import tqdm

    results = dict(done)
    total = count_entries(settings) if progress else None
    bar = tqdm(total=total, disable=not progress, unit="entry", desc="preprocess")
    shard_tasks = enumerate(_chunks(_iter_inputs(settings), settings.records_per_shard))

    def finished(row: dict) -> None:
        results[row["shard"]] = row
        with open(progress_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    with bar:
        if workers <= 1:
            tok = load_tokenizers(settings)
            for index, entries in shard_tasks:
                if index not in done:
                    finished(process_shard(str(out), index, entries, settings, tok))
                bar.update(len(entries))
        else:
            # spawn, not fork: a forked child of a process that has started JAX or tensorstore
            # threads can deadlock.
            ctx = multiprocessing.get_context("spawn")
            pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(settings,))
            with pool:
                pending: dict[cf.Future, int] = {}
                for index, entries in shard_tasks:
                    if index in done:
                        bar.update(len(entries))
                        continue
                    pending[pool.submit(_worker_shard, str(out), index, entries, settings)] = len(entries)
                    # A bounded window keeps memory flat however large the input is.
                    while len(pending) >= 2 * workers:
                        _drain(pending, bar, finished, cf.FIRST_COMPLETED)
                while pending:
                    _drain(pending, bar, finished, cf.ALL_COMPLETED)

    manifest = _write_outputs(out, settings, results)
    if manifest["n_records"] == 0:
        raise PreprocessError(
            f"every one of {manifest['n_rejected']} proteins was rejected ({reason_summary(manifest)}); "
            f"see {out / REJECTS}"
        )
    return manifest


def _drain(pending: dict, bar, finished, how) -> None:
    completed, _ = cf.wait(pending, return_when=how)
    for fut in completed:
        n = pending.pop(fut)
        finished(fut.result())
        bar.update(n)


def reason_summary(manifest: dict) -> str:
    return ", ".join(f"{n} {r}" for r, n in manifest["rejected_by_reason"].items())


def split_clustering(paths: Sequence[str]) -> dict | None:
    """The clustering behind inputs written by `esm3-jax split` (each in `<root>/<split>/`, beside
    `<root>/split.json`), for the manifest: the split's name and split.json less its skipped list.
    None when any input is not from one and the same split."""
    from esm3_jax.data import split as split_verb

    folders = {Path(p).resolve().parent for p in paths}
    if len(folders) != 1:
        return None
    (folder,) = folders
    info = folder.parent / split_verb.SPLIT_JSON
    if folder.name not in split_verb.SPLITS or not info.is_file():
        return None
    summary = json.loads(info.read_text())
    summary.pop("skipped", None)
    return {"split": folder.name, "split_json": str(info), **summary}


def check_contiguous(where: str, shards: Iterable[int]) -> None:
    shards = sorted(shards)
    if shards != list(range(len(shards))):
        raise PreprocessError(f"{where}: shards {shards} are not contiguous; rerun to finish them")


def summarize(settings: Settings, rows: Sequence[dict], write_line, clustering: dict | None) -> dict:
    """The manifest of the per-shard progress lines `rows` (in shard order); each reject goes to
    `write_line` as one line of rejects.jsonl, in the same order (deterministic)."""
    reasons: collections.Counter = collections.Counter()
    tracks: collections.Counter = collections.Counter()
    lengths: collections.Counter = collections.Counter()
    per_input = collections.defaultdict(lambda: [0, 0])
    for r in rows:
        for rej in r["rejects"]:
            write_line(json.dumps(rej) + "\n")
            reasons[rej["reason"]] += 1
        tracks.update(r["tracks"])
        lengths.update(r["lengths"])
        for k, (kept, rejected) in r["per_input"].items():
            per_input[int(k)][0] += kept
            per_input[int(k)][1] += rejected
    n_records = sum(r["n_records"] for r in rows)
    n_residues = sum(r["n_residues"] for r in rows)
    bins = [_length_bin(e) for e in _HIST_EDGES[:-1]]  # in length order
    manifest = {
        "format": {"manifest_version": MANIFEST_VERSION, "record_version": records.FORMAT_VERSION},
        "n_records": n_records,
        "n_residues": n_residues,
        "n_tokens": n_residues + 2 * n_records,  # with BOS and EOS
        "n_rejected": sum(reasons.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "tracks": {t: tracks.get(t, 0) for t in TRACKS},
        "length_histogram": {b: lengths[b] for b in bins if b in lengths},  # residues -> records
        "sources": [
            {"path": path, "kind": kind, "n_records": per_input[i][0], "n_rejected": per_input[i][1]}
            for i, (path, kind) in enumerate(settings.inputs)
        ],
        "records_per_shard": settings.records_per_shard,
        "shards": [{"file": r["file"], "n_records": r["n_records"], "sha256": r["sha256"]} for r in rows],
        "settings": settings.to_json(),
    }
    joins = [r["join"] for r in rows if "join" in r]
    if joins:  # a run that joined tracks by record id (the Beam path's --join): ids found in several inputs, and per input the proteins whose id no other input had
        unmatched: collections.Counter = collections.Counter()
        for j in joins:
            unmatched.update({int(k): v for k, v in j["unmatched"].items()})
        manifest["join"] = {
            "matched_ids": sum(j["matched"] for j in joins),
            "unmatched": [
                {"path": path, "n_unmatched": unmatched.get(i, 0)} for i, (path, _) in enumerate(settings.inputs)
            ],
        }
    if clustering is not None:
        manifest["clustering"] = clustering
    return manifest


def manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=1) + "\n"


def _write_outputs(out: Path, settings: Settings, results: dict[int, dict]) -> dict:
    """manifest.json and rejects.jsonl from the per-shard lines, in shard order (deterministic)."""
    check_contiguous(str(out), results)
    rows = [results[i] for i in sorted(results)]
    with open(out / REJECTS, "w") as f:
        manifest = summarize(settings, rows, f.write, split_clustering([path for path, _ in settings.inputs]))
    tmp = out / f".{MANIFEST}.partial"
    tmp.write_text(manifest_text(manifest))
    os.replace(tmp, out / MANIFEST)
    return manifest


# --- settings from the command line (the verb is preprocess_cli.py) ----------------------------------------


def settings_from_args(
    args: argparse.Namespace, kind_of=src.input_kind, exists=lambda p: Path(p).is_file()
) -> Settings:
    """The run's settings; `kind_of` and `exists` look at the inputs (local files here; the Beam
    path passes its own, for object stores)."""
    inputs = [(str(p), kind_of(str(p))) for p in args.inputs]
    for p in args.residue_labels:
        if not exists(str(p)):
            raise FileNotFoundError(f"residue label file not found: {p}")
        inputs.append((str(p), "residue_labels"))
    parse = src.ParseOptions(
        function_from_sccs=args.function_from_sccs,
        ppi_annotation_id=args.ppi_annotation_id,
        plddt=args.plddt,
        scope_domains_path=args.scope_des,
    )
    return Settings(
        inputs=tuple(inputs),
        records_per_shard=args.records_per_shard,
        min_length=args.min_length,
        max_unknown_fraction=args.max_unknown_fraction,
        function_vocab=args.function_vocab,
        structure_encoder=args.structure_encoder,
        parse=parse,
    )
