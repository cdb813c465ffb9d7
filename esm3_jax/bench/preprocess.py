"""`esm3-jax bench preprocess`: structures/s and sequences/s of preprocessing, the local path
(`-j N` processes) and the Beam path (the DirectRunner with N worker processes), in one run.

Each timed run writes a fresh output folder. Rounds alternate local, Beam, local, Beam, so that a
loaded machine slows both alike. Besides wall time, each run's CPU time (this process and every
worker process and mkdssp it waited for) per entry: on a shared machine that, not the wall time,
says what a dedicated vCPU would do, and prices a cluster run. Beam's fixed cost (building and starting the pipeline, starting the
workers) is measured on a one-protein input and reported apart: it does not grow with the data,
and a large run on a cluster pays it once.
"""

from __future__ import annotations

import itertools
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from esm3_jax.data import preprocess as pp
from esm3_jax.data import sources as src


def _inputs(work: Path, structures: str, sequences: str, n_structures: int, n_sequences: int) -> dict:
    """The first `n_structures` files of the structure folder and the first `n_sequences` entries of
    the sequence file, copied under `work` -> {kind: (settings, entries)}."""
    folder = work / "structures"
    folder.mkdir()
    files = src.structure_files(structures)[:n_structures]
    if not files:
        raise FileNotFoundError(f"{structures}: no structure files")
    for i, f in enumerate(files):  # numbered: the same name may occur in two subfolders
        shutil.copy(f, folder / f"{i:05d}_{f.name}")
    kind = src.input_kind(sequences)
    if kind not in ("fasta", "jsonl"):
        raise ValueError(f"{sequences}: expected a FASTA or jsonl file")
    seq_file = work / f"sequences.{kind}"
    entries = itertools.islice(src.iter_entries(sequences, kind), n_sequences)
    with open(seq_file, "w") as f:
        n_seq = 0
        for e in entries:
            n_seq += 1
            f.write(e.data if kind == "jsonl" else f">{e.data[0]}\n{e.data[1]}\n")
    tiny = work / "one.fasta"
    tiny.write_text(">one\nMKTAYIAKQRQISFVKSHFSRQ\n")
    rps = 100  # several shards per worker
    return {
        "structures": (pp.Settings(inputs=((str(folder), "structure_dir"),), records_per_shard=rps), len(files)),
        "sequences": (pp.Settings(inputs=((str(seq_file), kind),), records_per_shard=rps), n_seq),
        "one protein": (pp.Settings(inputs=((str(tiny), "fasta"),)), 1),
    }


def bench_preprocess(
    structures: str, sequences: str, *, workers: int = 2, n_structures: int = 100, n_sequences: int = 5000,
    repeats: int = 2, beam_mode: str = "multi_processing",
) -> dict:
    try:
        from esm3_jax.data import preprocess_beam
    except ModuleNotFoundError as e:
        if e.name != "apache_beam":
            raise
        preprocess_beam = None
        print("apache_beam is not installed (pip install -e '.[beam]'): the local path only")
    beam_args = [f"--direct_num_workers={workers}", f"--direct_running_mode={beam_mode}"]
    work = Path(tempfile.mkdtemp(prefix="esm3-jax-bench-preprocess-"))
    try:
        inputs = _inputs(work, structures, sequences, n_structures, n_sequences)
        paths = {"local": lambda s, out: pp.run(s, out, workers=workers, progress=False)}
        if preprocess_beam is not None:
            paths["beam"] = lambda s, out: preprocess_beam.run(s, str(out), beam_args=beam_args)
        seconds: dict = {(p, k): [] for p in paths for k in inputs}
        cpu: dict = {(p, k): [] for p in paths for k in inputs}
        manifests: dict = {}
        runs = itertools.count()
        for _ in range(repeats):
            for kind in inputs:
                for path, run in paths.items():
                    settings, _ = inputs[kind]
                    out = work / f"out{next(runs)}"
                    start, cpu_start = time.perf_counter(), _cpu_seconds()
                    manifest = run(settings, out)
                    seconds[(path, kind)].append(time.perf_counter() - start)
                    cpu[(path, kind)].append(_cpu_seconds() - cpu_start)
                    shutil.rmtree(out)
                    if manifests.setdefault(kind, manifest)["shards"] != manifest["shards"]:
                        raise AssertionError(f"{kind}: the {path} path wrote other shards than the first run")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"preprocess, {workers} workers per path (Beam: DirectRunner, {beam_mode}), median of {repeats} "
          "alternating rounds")  # fmt: skip
    print(f"{'path':6s} {'input':12s} {'entries':>8s} {'records':>8s} {'s':>8s} {'entries/s':>10s} "
          f"{'per worker':>10s} {'excl. fixed':>11s} {'CPU s':>8s} {'CPU s/entry':>11s}")  # fmt: skip
    result = {}
    for path in paths:
        fixed = statistics.median(seconds[(path, "one protein")])
        for kind, (_, n_entries) in inputs.items():
            t, c = statistics.median(seconds[(path, kind)]), statistics.median(cpu[(path, kind)])
            rate = n_entries / t
            # Entries/s per worker once the fixed cost is paid (what a long run approaches).
            steady = n_entries / (t - fixed) / workers if kind != "one protein" and t > fixed else float("nan")
            result[(path, kind)] = {"seconds": t, "entries_per_s": rate, "per_worker_steady": steady, "cpu_s": c}
            print(f"{path:6s} {kind:12s} {n_entries:8d} {manifests[kind]['n_records']:8d} {t:8.2f} {rate:10.2f} "
                  f"{rate / workers:10.2f} {steady:11.2f} {c:8.2f} {c / n_entries:11.4f}")  # fmt: skip
    print("entries: structure files or sequences; 'excl. fixed': entries/s per worker after subtracting that "
          "path's one-protein time (start-up); CPU s: this process and its finished children")  # fmt: skip
    return result



def _cpu_seconds() -> float:
    """User + system CPU time of this process and of every child process it has waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
