"""`esm3-jax preprocess --runner direct|dataflow|flink|spark`: preprocessing as an Apache Beam pipeline.

The only module that imports apache_beam (`pip install -e '.[beam]'`); the default `preprocess` path
never loads it. Inputs, outputs and record bytes are those of preprocess.py, whichever runner and
worker count: shard k holds the proteins of global input entries [k * records_per_shard,
(k + 1) * records_per_shard), in entry order, as the local path writes them. The per-entry and
per-shard work is preprocess.py's own code (`process_entry`, `write_shard_file`, `shard_row`,
`summarize`), so the two paths cannot drift apart.

The pipeline:

    read tasks (one per text input; a chunk of 1000 files of a structure folder, listed by the driver)
      -> entries (input, index within the input, Entry)       one worker per text file, streaming
      -> global entry index = entries of earlier inputs + index (a side input of per-input counts)
      -> drop entries of shards an earlier run finished (verified by sha256, in the pipeline)
      -> reshuffle, parse + tokenize each entry (tokenizers and the VQ-VAE encoder loaded once per
         worker, in DoFn.setup)                                -> (shard, (entry index, outcomes))
      [--join: group the proteins by record id, merge their tracks, tokenize the merged protein]
      -> group by shard, sort by entry index, write the shard (hidden name, then rename) and its
         progress line (.progress/shard-NNNNN.json)
      -> one final step: manifest.json, rejects.jsonl, progress.jsonl in shard order

Paths may be local or on any filesystem Beam knows (gs://, s3://, hdfs:// with the matching Beam
extra); structure files on an object store are copied to a local temporary file for parsing.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import tempfile
import typing
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from esm3_jax.data import preprocess as pp
from esm3_jax.data import sources as src

RUNNERS = {"direct": "DirectRunner", "dataflow": "DataflowRunner", "flink": "FlinkRunner", "spark": "SparkRunner"}
PROGRESS_DIR = ".progress"  # one progress line per finished shard, written by the worker that wrote it
# The driver lists each structure folder once, into LISTING_DIR in the output folder (a listing of
# millions of paths is too large to travel inside the job's graph); a read task is a chunk of it.
LISTING_DIR = ".listing"
_FILES_PER_TASK = 1000


# --- paths: local, or an object store through Beam's filesystems ---------------------------------------------


def is_local(path: str) -> bool:
    return FileSystems.get_scheme(str(path)) is None


def _join(base: str, *parts: str) -> str:
    return os.path.join(base, *parts) if is_local(base) else FileSystems.join(base, *parts)


def _exists(path: str) -> bool:
    return os.path.exists(path) if is_local(path) else FileSystems.exists(path)


def open_text(path: str) -> io.TextIOBase:
    """A text input from any filesystem, gunzipping `*.gz` (as sources.open_text does locally)."""
    if is_local(path):
        return src.open_text(path)
    if not FileSystems.exists(path):
        raise FileNotFoundError(f"input not found: {path}")
    raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    if path.endswith(".gz"):  # Python's gzip, as locally: a cut file fails loudly rather than ending early
        raw = gzip.GzipFile(fileobj=raw, mode="rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")


def _read_bytes(path: str) -> bytes:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


def _write_bytes(path: str, data: bytes) -> None:
    """Whole-file write that never leaves a partial file under `path`."""
    if is_local(path):
        tmp = f"{path}.partial"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:  # object stores publish an object only when its upload completes
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(data)


def _sha256(path: str) -> str | None:
    """The file's sha256, or None when it does not exist."""
    if not _exists(path):
        return None
    h = hashlib.sha256()
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_kind(path: str) -> str:
    """preprocess's kind of an input (sources.input_kind for local paths)."""
    if is_local(path):
        return src.input_kind(path)
    if FileSystems.exists(path):
        return src.file_kind(path)
    if structure_files(path):
        return "structure_dir"
    raise FileNotFoundError(f"input not found: {path}")


def structure_files(folder: str) -> list[tuple[str, int]]:
    """(path, size) of the structure files under `folder`, recursive, in sources.structure_files order."""
    if is_local(folder):
        return [(str(p), p.stat().st_size) for p in src.structure_files(folder)]
    found = FileSystems.match([folder.rstrip("/") + "/**"])[0].metadata_list
    files = [(m.path, m.size_in_bytes) for m in found if src._bare_suffix(Path(m.path)) in src.STRUCTURE_SUFFIXES]
    return sorted(files, key=lambda f: f[0].split("/"))  # path-component order, as pathlib sorts


def _file_size(path: str) -> int:
    if is_local(path):
        return Path(path).stat().st_size
    return FileSystems.match([path])[0].metadata_list[0].size_in_bytes


def input_fingerprint(settings: pp.Settings, listings: dict[int, list[tuple[str, int]]]) -> list:
    """preprocess._input_fingerprint, for any filesystem: [path, files, bytes] per input."""
    fp = []
    for i, (path, kind) in enumerate(settings.inputs):
        files = listings[i] if kind == "structure_dir" else [(path, _file_size(path))]
        fp.append([path, len(files), sum(size for _, size in files)])
    return fp


# --- reading: one worker per text input; structure files come listed ---------------------------------------


@dataclasses.dataclass(frozen=True)
class ReadTask:
    input_index: int
    kind: str  # an input kind; "structure_files" for a chunk of a folder's listing
    path: str  # the input; structure_files: the listing file
    first: int = 0  # structure_files: the chunk's first file, as an index within its input ...
    offset: int = 0  # ... and as a byte offset in the listing
    count: int = 0  # structure_files: files in the chunk


def read_tasks(settings: pp.Settings, listings: dict[int, list[tuple[str, int]]], out: str) -> list[ReadTask]:
    """One task per text input; structure folders are written to listing files and cut in chunks."""
    tasks = []
    for i, (path, kind) in enumerate(settings.inputs):
        if kind != "structure_dir":
            tasks.append(ReadTask(i, kind, path))
            continue
        lines = [f"{p}\n".encode() for p, _ in listings[i]]
        listing = _join(out, LISTING_DIR, f"input-{i:04d}.txt")
        _write_bytes(listing, b"".join(lines))
        offset = 0
        for start in range(0, len(lines), _FILES_PER_TASK):
            chunk = lines[start : start + _FILES_PER_TASK]
            tasks.append(ReadTask(i, "structure_files", listing, start, offset, len(chunk)))
            offset += sum(len(line) for line in chunk)
    return tasks


def enumerate_task(task: ReadTask) -> Iterator[tuple[int, int, src.Entry]]:
    """(input index, entry index within the input, entry), streaming the input."""
    if task.kind == "structure_files":
        with FileSystems.open(task.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.seek(task.offset)
            for k in range(task.count):
                p = f.readline().decode().rstrip("\n")
                yield task.input_index, task.first + k, src.Entry("structure", p, p)
        return
    for k, entry in enumerate(src.iter_entries(task.path, task.kind, open_fn=open_text)):
        yield task.input_index, k, entry


def _offsets(counts: Iterable[tuple[int, int]], n_inputs: int) -> list[int]:
    """Global index of each input's first entry: the entries of all earlier inputs."""
    per_input = dict(counts)
    offsets, total = [], 0
    for i in range(n_inputs):
        offsets.append(total)
        total += per_input.get(i, 0)
    return offsets


# --- per entry: parse and tokenize, with the tokenizers loaded once per worker --------------------------------


@dataclasses.dataclass(frozen=True)
class Proteins:
    """What one entry parsed to, before tokenization (the --join path merges these across inputs)."""

    input_index: int
    location: str
    items: tuple  # RawProtein | SourceError, in file order


def _local_copy(entry: src.Entry, tmpdir: str) -> src.Entry:
    """A structure entry on an object store, copied to a local file of the same name for parsing."""
    if entry.kind != "structure" or is_local(str(entry.data)):
        return entry
    local = os.path.join(tmpdir, str(entry.data).rsplit("/", 1)[-1])
    with FileSystems.open(str(entry.data), compression_type=CompressionTypes.UNCOMPRESSED) as f_in:
        with open(local, "wb") as f_out:
            shutil.copyfileobj(f_in, f_out)
    return src.Entry(entry.kind, entry.location, local)


def _parse(input_index: int, entry: src.Entry, settings: pp.Settings) -> Proteins:
    with tempfile.TemporaryDirectory(prefix="esm3-jax-beam-") as tmpdir:
        items = src.parse_entry(_local_copy(entry, tmpdir), settings.parse)
    return Proteins(input_index, entry.location, tuple(items))


class _WithTokenizers(beam.DoFn):
    def __init__(self, settings: pp.Settings):
        self.settings = settings
        self.tok = None

    def setup(self):
        # Once per worker: the function vocabulary (tens of MB) and the VQ-VAE structure encoder
        # (JAX weights and compiled programs) are far too costly to load per element.
        self.tok = pp.load_tokenizers(self.settings)


# Elements grouped by shard, one layout for both paths:
#   (shard, (key, outcomes, others, merged, unmatched))
# Every entry sends one item keyed (entry index, -1) to its shard, so that n_entries and the set of
# shards are the plain path's; its outcomes are the entry's proteins in file order (plain path) or
# none (--join). A --join protein has key (entry index of its first part, position within that
# entry), one outcome, `others` (the outcome again for each other input that contributed: per-input
# counts), `merged` (parts from several inputs) and `unmatched` ([its input] when no other input had
# that id).


class TokenizeEntries(_WithTokenizers):
    """(global index, input index, entry) -> (shard, entry item with one outcome per protein)."""

    def process(self, element):
        index, input_index, entry = element
        parsed = _parse(input_index, entry, self.settings)
        outcomes = [pp.outcome(input_index, parsed.location, item, self.settings, self.tok) for item in parsed.items]
        yield index // self.settings.records_per_shard, ((index, -1), outcomes, [], False, [])


# --- --join: tracks of one protein from several inputs, merged by record id -----------------------------------

# RawProtein fields that carry a track (the sequence is shared and must agree).
_JOIN_FIELDS = tuple(f.name for f in dataclasses.fields(src.RawProtein) if f.name not in ("id", "source", "sequence"))


def merge_proteins(parts: Sequence[src.RawProtein]) -> src.RawProtein:
    """One protein from its parts (from different inputs, in input order). Raises SourceError when
    their sequences differ or two parts carry the same track."""
    first = parts[0]
    fields: dict = {}
    owner: dict[str, str] = {}
    for part in parts:
        if part.sequence != first.sequence:
            what = (
                f"{len(part.sequence)} residues in {part.source}, {len(first.sequence)} in {first.source}"
                if len(part.sequence) != len(first.sequence)
                else f"{part.source} and {first.source} hold different sequences of {len(first.sequence)} residues"
            )
            raise src.SourceError("join mismatch", what, first.id)
        for name in _JOIN_FIELDS:
            value = getattr(part, name)
            if value is None:
                continue
            if name in fields:
                raise src.SourceError("join conflict", f"both {owner[name]} and {part.source} give {name}", first.id)
            fields[name], owner[name] = value, part.source
    return dataclasses.replace(first, source=" + ".join(p.source for p in parts), **fields)


@beam.typehints.with_output_types(typing.Any)  # its tagged outputs confuse Beam's type inference
class ParseEntries(beam.DoFn):
    """--join, step 1: each parsed protein keyed by its record id; parse errors and the entry's
    marker go straight to the entry's shard.

    A merged protein sits where its first part (in input order) would: (entry index, position within
    the entry) orders it, so a join in which nothing matches writes the shards a plain run writes.
    """

    def __init__(self, settings: pp.Settings):
        self.settings = settings

    def process(self, element):
        index, input_index, entry = element
        parsed = _parse(input_index, entry, self.settings)
        yield beam.pvalue.TaggedOutput(
            "entries", (index // self.settings.records_per_shard, ((index, -1), [], [], False, []))
        )
        for pos, item in enumerate(parsed.items):
            if isinstance(item, src.SourceError):
                yield beam.pvalue.TaggedOutput("errors", ((index, pos), input_index, parsed.location, item))
            else:
                yield item.id, ((index, pos), input_index, parsed.location, item)


class TokenizeJoined(_WithTokenizers):
    """--join, step 2: the parts of one record id -> the merged, tokenized protein, keyed by its shard.
    A second part from the same input is rejected ("duplicate id") where it stands."""

    def process(self, element):
        _, parts = element
        parts = sorted(parts, key=lambda part: part[0])
        first_of_input: dict[int, tuple] = {}
        for part in parts:
            key, input_index, location, raw = part
            if input_index in first_of_input:
                earlier = first_of_input[input_index][3].source
                dup = src.SourceError("duplicate id", f"{raw.id!r} was read from {earlier} already", raw.id)
                yield self._item(key, input_index, location, dup, [], False, [])
            else:
                first_of_input[input_index] = part
        kept = list(first_of_input.values())
        key, input_index, location, _ = kept[0]
        try:
            item = merge_proteins([part[3] for part in kept]) if len(kept) > 1 else kept[0][3]
        except src.SourceError as e:
            item = e
        merged = len(kept) > 1
        others = [part[1] for part in kept[1:]]
        yield self._item(key, input_index, location, item, others, merged, [] if merged else [input_index])

    def _item(self, key, input_index, location, item, others, merged, unmatched):
        o = pp.outcome(input_index, location, item, self.settings, self.tok)
        shard = key[0] // self.settings.records_per_shard
        return shard, (key, [o], [o._replace(input_index=i) for i in others], merged, unmatched)


class TokenizeErrors(_WithTokenizers):
    """--join: a protein whose parsing failed -> its reject, where it stands."""

    def process(self, element):
        key, input_index, location, item = element
        o = pp.outcome(input_index, location, item, self.settings, self.tok)
        yield key[0] // self.settings.records_per_shard, (key, [o], [], False, [])


# --- per shard: write it and its progress line -------------------------------------------------------------------


def shard_path(out: str, index: int) -> str:
    return _join(out, pp.shard_name(index))


def _progress_path(out: str, index: int) -> str:
    return _join(out, PROGRESS_DIR, f"{pp.shard_name(index)}.json")


class WriteShard(beam.DoFn):
    """(shard, its items) -> the shard file and its progress line (written, and passed on)."""

    def __init__(self, out: str, join: bool):
        self.out, self.join = out, join

    def process(self, element):
        index, items = element
        items = sorted(items, key=lambda it: it[0])
        outcomes = [o for it in items for o in it[1]]
        n_entries = sum(1 for it in items if it[0][1] == -1)
        path = shard_path(self.out, index)
        if is_local(self.out):
            sha256 = pp.write_shard_file(Path(path), outcomes)
        else:  # ArrayRecord writes local files: write one, upload it under a hidden name, rename
            with tempfile.TemporaryDirectory(prefix="esm3-jax-beam-") as tmpdir:
                local = Path(tmpdir) / pp.shard_name(index)
                sha256 = pp.write_shard_file(local, outcomes)
                partial = _join(self.out, f".{pp.shard_name(index)}.partial")
                with open(local, "rb") as f_in, FileSystems.create(
                    partial, compression_type=CompressionTypes.UNCOMPRESSED
                ) as f_out:
                    shutil.copyfileobj(f_in, f_out)
                FileSystems.rename([partial], [path])
        extra = None
        if self.join:
            unmatched = collections.Counter(i for it in items for i in it[4])
            extra = {
                "join": {
                    "matched": sum(1 for it in items if it[3]),
                    "unmatched": {str(k): v for k, v in sorted(unmatched.items())},
                }
            }
        row = pp.shard_row(index, n_entries, outcomes, sha256, extra)
        others = [o for it in items for o in it[2]]
        if others:  # a merged record counts as kept (or rejected) for every input that contributed
            per_input = {int(k): v for k, v in row["per_input"].items()}
            for o in others:
                per_input.setdefault(o.input_index, [0, 0])[0 if isinstance(o, pp.Kept) else 1] += 1
            row["per_input"] = {str(k): v for k, v in sorted(per_input.items())}
        _write_bytes(_progress_path(self.out, index), json.dumps(row).encode())
        yield row


def verify_done(row: dict, out: str) -> Iterator[dict]:
    """A finished shard of an earlier run, kept when its file still has the recorded checksum."""
    if _sha256(shard_path(out, row["shard"])) == row["sha256"]:
        yield row


class Finalize(beam.DoFn):
    """Every shard's progress line -> manifest.json, rejects.jsonl, progress.jsonl (shard order)."""

    def __init__(self, out: str, settings: pp.Settings, header: dict, clustering: dict | None):
        self.out, self.settings, self.header, self.clustering = out, settings, header, clustering

    def process(self, element):
        _, rows = element
        results = {r["shard"]: r for r in rows}
        pp.check_contiguous(self.out, results)
        rows = [results[i] for i in sorted(results)]
        rejects = io.StringIO()
        manifest = pp.summarize(self.settings, rows, rejects.write, self.clustering)
        _write_bytes(_join(self.out, pp.REJECTS), rejects.getvalue().encode())
        progress = "".join(json.dumps(line) + "\n" for line in [self.header, *rows])
        _write_bytes(_join(self.out, pp.PROGRESS), progress.encode())
        _write_bytes(_join(self.out, pp.MANIFEST), pp.manifest_text(manifest).encode())
        yield manifest["n_records"]


# --- the run ----------------------------------------------------------------------------------------------------


def _earlier_rows(out: str, header: dict, overwrite: bool) -> list[dict]:
    """Progress lines of finished shards from an earlier run with the same settings (local or Beam)."""
    progress = _join(out, pp.PROGRESS)
    if not _exists(progress):
        return []
    rows = pp.earlier_progress(
        _read_bytes(progress).decode().splitlines(), header, overwrite, out,
        (_read_bytes(path).decode() for path in _progress_files(out)),
    )
    return [rows[i] for i in sorted(rows)]


def _matching(pattern: str) -> list[str]:
    """Paths matching a glob (none when its folder is absent; object stores have no folders)."""
    if is_local(pattern) and not os.path.isdir(os.path.dirname(pattern)):
        return []
    return [m.path for m in FileSystems.match([pattern])[0].metadata_list]


def _progress_files(out: str) -> list[str]:
    return _matching(_join(out, PROGRESS_DIR, "*.json"))


def _clear(out: str) -> None:
    """An output folder's shards and progress lines, before a run that starts afresh."""
    stale = _matching(_join(out, f"{pp.SHARD_PREFIX}-*{pp.records.SHARD_SUFFIX}")) + _progress_files(out)
    if stale:
        FileSystems.delete(stale)


def build_pipeline(
    p: beam.Pipeline, settings: pp.Settings, out: str, *, join: bool = False, overwrite: bool = False
) -> None:
    """Add the preprocessing of `settings.inputs` into `out` to the pipeline `p` (resuming an earlier run)."""
    settings.validate()
    listings = {i: structure_files(path) for i, (path, kind) in enumerate(settings.inputs) if kind == "structure_dir"}
    header = {"settings": settings.to_json(), "inputs": input_fingerprint(settings, listings)}
    if join:
        header["join"] = True
    if is_local(out):
        os.makedirs(out, exist_ok=True)
    elif not FileSystems.exists(out):
        FileSystems.mkdirs(out)
    earlier = _earlier_rows(out, header, overwrite)
    if overwrite or not _exists(_join(out, pp.PROGRESS)):
        _clear(out)
        earlier = []
    if is_local(out):
        os.makedirs(_join(out, PROGRESS_DIR), exist_ok=True)
        os.makedirs(_join(out, LISTING_DIR), exist_ok=True)
    # The header now; the finished shards' lines are added when the run completes (and meanwhile
    # live in .progress/, one file per shard, written by the worker that finished it).
    _write_bytes(_join(out, pp.PROGRESS), "".join(json.dumps(x) + "\n" for x in [header, *earlier]).encode())
    clustering = pp.split_clustering([path for path, _ in settings.inputs]) if all(
        is_local(path) for path, _ in settings.inputs
    ) else None
    rps = settings.records_per_shard

    done_rows = p | "EarlierShards" >> beam.Create(earlier) | "VerifyEarlier" >> beam.FlatMap(verify_done, out)
    done = beam.pvalue.AsDict(done_rows | "DoneIndex" >> beam.Map(lambda r: (r["shard"], True)))
    entries = (
        p
        | "ReadTasks" >> beam.Create(read_tasks(settings, listings, out))
        | "SpreadTasks" >> beam.Reshuffle()
        | "Enumerate" >> beam.FlatMap(enumerate_task)
    )
    counts = entries | "InputOf" >> beam.Map(lambda e: (e[0], 1)) | "CountPerInput" >> beam.CombinePerKey(sum)
    offsets = beam.pvalue.AsSingleton(
        counts
        | "AllCounts" >> beam.combiners.ToList()
        | "Offsets" >> beam.Map(_offsets, len(settings.inputs))
    )

    def global_index(e, offsets, done):
        input_index, k, entry = e
        index = offsets[input_index] + k
        if index // rps not in done:
            yield index, input_index, entry

    todo = entries | "GlobalIndex" >> beam.FlatMap(global_index, offsets, done) | "Spread" >> beam.Reshuffle()
    if join:
        parsed = todo | "Parse" >> beam.ParDo(ParseEntries(settings)).with_outputs("errors", "entries", main="proteins")
        joined = parsed.proteins | "ById" >> beam.GroupByKey() | "Merge" >> beam.ParDo(TokenizeJoined(settings))
        errors = parsed.errors | "Errors" >> beam.ParDo(TokenizeErrors(settings))
        by_shard = (joined, errors, parsed.entries) | "AllShardItems" >> beam.Flatten()
    else:
        by_shard = todo | "Tokenize" >> beam.ParDo(TokenizeEntries(settings))
    rows = by_shard | "ByShard" >> beam.GroupByKey() | "WriteShard" >> beam.ParDo(WriteShard(out, join))
    (
        (rows, done_rows)
        | "AllRows" >> beam.Flatten()
        | "OneKey" >> beam.Map(lambda r: (None, r))
        | "Together" >> beam.GroupByKey()
        | "Finalize" >> beam.ParDo(Finalize(out, settings, header, clustering))
    )


def run(
    settings: pp.Settings,
    out: str,
    *,
    runner: str = "direct",
    beam_args: Sequence[str] = (),
    join: bool = False,
    overwrite: bool = False,
) -> dict:
    """Preprocess on Beam's `runner` ("direct", "dataflow", "flink", "spark"); returns the manifest."""
    if runner not in RUNNERS:
        raise ValueError(f"unknown runner {runner!r}; choose from {', '.join(RUNNERS)}")
    options = PipelineOptions([f"--runner={RUNNERS[runner]}", *beam_args])
    out = str(out)
    with beam.Pipeline(options=options) as p:
        build_pipeline(p, settings, out, join=join, overwrite=overwrite)
    manifest = json.loads(_read_bytes(_join(out, pp.MANIFEST)))
    finished = _progress_files(out) + _matching(_join(out, LISTING_DIR, "*.txt"))  # done with
    # (the progress lines are in progress.jsonl now)
    if finished:
        FileSystems.delete(finished)
    for folder in (PROGRESS_DIR, LISTING_DIR):
        if is_local(out) and os.path.isdir(_join(out, folder)):
            os.rmdir(_join(out, folder))
    if manifest["n_records"] == 0:
        raise pp.PreprocessError(
            f"every one of {manifest['n_rejected']} proteins was rejected ({pp.reason_summary(manifest)}); "
            f"see {_join(out, pp.REJECTS)}"
        )
    return manifest


def settings_from_args(args: argparse.Namespace) -> pp.Settings:
    """preprocess.settings_from_args, for inputs on any filesystem."""
    return pp.settings_from_args(args, kind_of=input_kind, exists=_exists)
