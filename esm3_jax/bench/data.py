"""Throughput of the input pipeline on one worker, to set against the train step's tokens/s."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from esm3_jax.bench.train_step import bench_train_step
from esm3_jax.data.config import DataConfig, DatasetSpec
from esm3_jax.data.pipeline import make_iterator
from esm3_jax.train.config import load_config, resolve_config_path


def bench_pipeline(data_dir: str | Path, cfg: DataConfig, n_batches: int, warmup: int = 3) -> dict:
    """Time `n_batches` host batches of the full pipeline (decode, crop, noise, pack, batch) over
    the dataset in `data_dir`, in this process (worker_count=0), as a single host.

    Returns records/s (proteins), tokens/s (real tokens: BOS/EOS and residues, no padding), the
    padded tokens/s the model consumes, how full the rows are, and the same rates per CPU-second.
    """
    if n_batches <= 0:
        raise ValueError(f"n_batches must be positive, got {n_batches}")
    cfg = dataclasses.replace(cfg, datasets=(DatasetSpec(str(data_dir)),), worker_count=0)
    cfg.validate()
    it = make_iterator(cfg, process_index=0, process_count=1)
    for _ in range(warmup):  # opens the shards, fills the read-ahead buffer
        next(it)
    proteins = tokens = slots = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(n_batches):
        sequence_id = next(it)["sequence_id"]
        proteins += int(sequence_id.max(axis=1).sum())  # ids run 1..n in each row
        tokens += int(np.count_nonzero(sequence_id))
        slots += sequence_id.size
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start  # all threads of this process
    return {
        "data_dir": str(data_dir),
        "batches": n_batches,
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "packing": cfg.packing,
        "read_threads": cfg.read_threads,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "records_per_s": proteins / seconds,
        "tokens_per_s": tokens / seconds,
        "padded_tokens_per_s": slots / seconds,
        "batches_per_s": n_batches / seconds,
        "row_fill": tokens / slots,
        "proteins_per_row": proteins / (n_batches * cfg.batch_size),
        # Per CPU-second: what one dedicated core would sustain, whatever else the machine runs.
        "records_per_cpu_s": proteins / cpu_seconds,
        "tokens_per_cpu_s": tokens / cpu_seconds,
    }


def bench_data(data_dir: str, config: str, n_batches: int) -> dict:
    cfg = load_config(resolve_config_path(config))
    p = bench_pipeline(data_dir, cfg.data, n_batches)
    print(f"pipeline ({data_dir}, one worker, batch {cfg.data.batch_size} x {cfg.data.max_length}, "
          f"packing {cfg.data.packing}): {p['records_per_s']:.0f} records/s, {p['tokens_per_s']:.0f} tokens/s "
          f"({p['padded_tokens_per_s']:.0f} padded tokens/s, rows {100 * p['row_fill']:.0f}% full)")
    t = bench_train_step(config, cfg.data.batch_size, cfg.data.max_length, steps=3, verbose=False)
    ratio = p["padded_tokens_per_s"] / t["tokens_per_s"]
    print(f"train step ({config}, same batch shape): {t['tokens_per_s']:.0f} tokens/s")
    print(f"pipeline / train step: {ratio:.1f}x  ({'ok' if ratio >= 20 else 'BELOW'} the 20x target)")
    p.update(train_tokens_per_s=t["tokens_per_s"], ratio=ratio)
    return p
