"""The training input pipeline: ArrayRecord shards -> cropped, noised, packed, batched arrays.

Stages (one Grain graph, so the whole thing is deterministic and checkpointable):

1. per dataset: the ArrayRecord source, this host's disjoint slice `[process_index::process_count]`,
   a seeded shuffle that changes every epoch, repeat;
2. a weighted mixture of the datasets (index-based, so it is as deterministic as the rest);
3. per protein (`make_example`, seeded from the pipeline seed and the element's index):
   decode, crop to `max_length`, add BOS/EOS where the protein was not cut, mask every track from
   its noise schedule or drop it whole, derive targets and loss masks;
4. Grain's first-fit packing of proteins into rows of `max_length` (sequence_id 1..n tells them
   apart, 0 is padding), or one protein per row when `packing` is off; then batching to this
   host's rows, and `worker_count` grain processes when asked.

Malformed records are skipped and counted (the count lives in the iterator state, see
`malformed_count`). The keys, shapes and pads are batch.py's; every key is present in every
batch. Placing a host's rows on the devices is train/sharding.py's `global_batch`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset

from esm3_jax import tokens as T
from esm3_jax.batch import BATCH_KEYS, TRAINING_FIELDS, Field  # noqa: F401  (BATCH_KEYS: the keys of every batch)
from esm3_jax.data.config import DataConfig, NoiseConfig
from esm3_jax.data.noise import sample_mask
from esm3_jax.data.records import ProteinRecord, RecordFormatError, deserialize, open_source

log = logging.getLogger(__name__)

# Every array of a batch but sequence_id, which the packer writes as its segment ids (batch.py).
_FIELDS: dict[str, Field] = {k: f for k, f in TRAINING_FIELDS.items() if k != "sequence_id"}
# Optional provenance per position (dataset number, record number within it), for tests/debugging.
_SOURCE_FIELDS = {"source_dataset": Field((), np.int32, -1), "source_index": Field((), np.int32, -1)}

# Sequence ids that are not residues: no masking, no loss, structure specials patched in.
_NOT_RESIDUE = np.zeros(T.SEQUENCE_EMBED_ROWS, bool)
_NOT_RESIDUE[[T.SEQUENCE_BOS, T.SEQUENCE_PAD, T.SEQUENCE_EOS, T.SEQUENCE_CHAINBREAK, T.SEQUENCE_MASK]] = True
_FIRST_CLASS = {"ss8": T.SS8_UNK + 1, "sasa": T.SASA_FIRST_BIN}
_MAX_CONSECUTIVE_MALFORMED = 1000


# --- one protein ---------------------------------------------------------------------------------


def crop_window(n_residues: int, max_length: int, mode: str, rng: np.random.Generator) -> tuple[int, int]:
    """[start, stop) of the kept tokens within the protein's BOS + residues + EOS (n_residues + 2).

    A protein that fits is kept whole. Otherwise a window of exactly `max_length` tokens is cut
    from the BOS/EOS-wrapped sequence, so BOS survives only when the window starts at the very
    beginning and EOS only when it reaches the very end: the token on a cut side is a residue,
    which tells the model it sees a fragment (ESM3_SPEC section 1).
    """
    total = n_residues + 2
    if total <= max_length:
        return 0, total
    start = 0 if mode == "head" else int(rng.integers(0, total - max_length + 1))
    return start, start + max_length


def _wrap(values: np.ndarray, r0: int, r1: int, bos: bool, eos: bool, bos_value, eos_value, dtype) -> np.ndarray:
    """values[r0:r1] with the BOS/EOS slots the crop kept, as a fresh array of `dtype`."""
    n = r1 - r0
    out = np.empty((n + bos + eos, *values.shape[1:]), dtype)
    out[bos : bos + n] = values[r0:r1]
    if bos:
        out[0] = bos_value
    if eos:
        out[-1] = eos_value
    return out


def _track_mask(track: str, noise: NoiseConfig, eligible_L: np.ndarray, rng: np.random.Generator):
    """(masked_L, dropped): the track's noise mask for one protein, or all of it when dropped."""
    if rng.random() < noise.dropout(track):
        return eligible_L.copy(), True
    return sample_mask(noise.schedule(track), eligible_L, rng), False


def make_example(record: ProteinRecord, cfg: DataConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Crop one protein, add BOS/EOS, noise every track; returns `_FIELDS` arrays of length <= max_length.

    Targets are the uncorrupted tokens; a track the record lacks has pad targets and no loss.
    """
    noise = cfg.noise
    n = len(record)
    start, stop = crop_window(n, cfg.max_length, cfg.crop, rng)
    bos, eos = start == 0, stop == n + 2
    r0, r1 = max(start - 1, 0), min(stop - 1, n)
    length = stop - start

    def wrap(values, bos_value, eos_value, dtype):
        return _wrap(values, r0, r1, bos, eos, bos_value, eos_value, dtype)

    out: dict[str, np.ndarray] = {}
    sequence_L = wrap(record.sequence_tokens, T.SEQUENCE_BOS, T.SEQUENCE_EOS, np.int32)
    residue_L = ~_NOT_RESIDUE[sequence_L]
    chainbreak_L = sequence_L == T.SEQUENCE_CHAINBREAK

    def finish(track: str, target, valid_L, masked_L, dropped, mask_value):
        """Store input/target/loss mask; `masked_L` positions of the input become `mask_value`."""
        inp = target.copy()
        inp[masked_L] = mask_value
        loss_L = masked_L & valid_L
        if dropped and not noise.loss_on_dropped_tracks:
            loss_L[:] = False
        out[f"{track}_tokens"], out[f"{track}_target"], out[f"{track}_loss_mask"] = inp, target, loss_L

    # sequence: always present.
    masked, dropped = _track_mask("sequence", noise, residue_L, rng)
    finish("sequence", sequence_L, residue_L, masked, dropped, T.SEQUENCE_MASK)

    # structure tokens. The sampled mask is drawn even for a record without tokens, because the
    # coordinates' mask must cover it (the superset rule) whatever the token track holds.
    structure_masked, dropped = _track_mask("structure", noise, residue_L, rng)
    if record.structure_tokens is not None:
        target = wrap(record.structure_tokens, T.STRUCTURE_BOS, T.STRUCTURE_EOS, np.int32)
        target[chainbreak_L] = T.STRUCTURE_CHAINBREAK
        finish("structure", target, residue_L & (target < T.STRUCTURE_CODEBOOK_SIZE), structure_masked,
               dropped, T.STRUCTURE_MASK)
    else:
        inp = np.where(residue_L, T.STRUCTURE_MASK, T.STRUCTURE_PAD).astype(np.int32)
        if bos:
            inp[0] = T.STRUCTURE_BOS
        if eos:
            inp[-1] = T.STRUCTURE_EOS
        inp[chainbreak_L] = T.STRUCTURE_CHAINBREAK
        out["structure_tokens"] = inp
        out["structure_target"] = np.full(length, T.STRUCTURE_PAD, np.int32)
        out["structure_loss_mask"] = np.zeros(length, bool)

    # per-residue categorical tracks whose pad id doubles as mask/BOS/EOS.
    for track, field, trailing in (
        ("ss8", "ss8_tokens", ()),
        ("sasa", "sasa_tokens", ()),
        ("function", "function_tokens", (T.FUNCTION_DEPTH,)),
        ("residue_annotation", "residue_annotation_tokens", (T.RESIDUE_MAX_ANNOTATIONS,)),
    ):
        masked, dropped = _track_mask(track, noise, residue_L, rng)
        values = getattr(record, field)
        if values is None:
            target = np.zeros((length, *trailing), np.int32)
            valid_L = np.zeros(length, bool)
        else:
            target = wrap(values, 0, 0, np.int32)
            target[chainbreak_L] = 0
            if track == "residue_annotation":  # multi-label: "no label here" is a real target
                valid_L = residue_L
            elif track == "function":  # <unk> (an all-zero TF-IDF vector) is a real prediction
                valid_L = residue_L & (target != T.FUNCTION_PAD).any(axis=1)
            else:  # pad / <motif> / <unk> are not classes to predict
                valid_L = residue_L & (target >= _FIRST_CLASS[track])
        finish(track, target, valid_L, masked, dropped, 0)

    # coordinates: own schedule OR'd with the structure-token mask, so they never reveal a masked token.
    coord_masked, _ = _track_mask("coordinates", noise, residue_L, rng)
    if record.coordinates is not None:
        coords = wrap(record.coordinates, np.nan, np.nan, np.float32)
        coords[coord_masked | structure_masked | chainbreak_L] = np.nan
    else:
        coords = np.full((length, 3, 3), np.nan, np.float32)
    out["structure_coords"] = coords

    # pLDDT: the record's, else 1.0 (experimental structures; also the reference's inference
    # default for average_plddt). Per residue it is shown only where a usable frame is shown,
    # as inference builds it from the coordinates it is given.
    frame_L = np.isfinite(coords).all(axis=(1, 2))
    if record.plddt is not None:
        per_res = np.nan_to_num(wrap(record.plddt, 0.0, 0.0, np.float32), nan=0.0)
        finite = record.plddt[np.isfinite(record.plddt)]
        average = float(finite.mean()) if finite.size else 1.0
    else:
        per_res, average = np.ones(length, np.float32), 1.0
    out["per_res_plddt"] = np.where(frame_L, per_res, 0.0).astype(np.float32)
    out["average_plddt"] = np.full(length, average, np.float32)

    if record.chain_id is not None and n:
        out["chain_id"] = wrap(record.chain_id, record.chain_id[0], record.chain_id[-1], np.int32)
    else:
        out["chain_id"] = np.zeros(length, np.int32)
    return out


# --- Grain plumbing --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Malformed:
    """Stands in for a record that failed to decode, so that it can be counted, then dropped."""

    dataset: int
    index: int
    reason: str


class _TagIndex(grain.transforms.MapWithIndex):
    """bytes -> (dataset number, record number, bytes), before any slicing or shuffling."""

    def __init__(self, dataset: int):
        self._dataset = dataset

    def map_with_index(self, index: int, element: bytes):
        return self._dataset, index, element


class _ToExample(grain.transforms.RandomMap):
    def __init__(self, cfg: DataConfig, layout: "_ColumnLayout"):
        self._cfg, self._layout = cfg, layout

    def random_map(self, element, rng: np.random.Generator):
        dataset, index, raw = element
        try:
            example = make_example(deserialize(raw), self._cfg, rng)
        except RecordFormatError as e:
            return _Malformed(dataset, index, str(e))
        if "source_index" in self._layout.fields:
            length = len(example["sequence_tokens"])
            example["source_dataset"] = np.full(length, dataset, np.int32)
            example["source_index"] = np.full(length, index, np.int32)
        return self._layout.join(example)


class _SkipMalformedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, dataset_paths: tuple[str, ...]):
        super().__init__(parent)
        self._paths = dataset_paths
        self._malformed = 0

    def __next__(self):
        for _ in range(_MAX_CONSECUTIVE_MALFORMED):
            element = next(self._parent)
            if not isinstance(element, _Malformed):
                return element
            self._malformed += 1
            log.warning("skipping malformed record %d of %s: %s", element.index,
                        self._paths[element.dataset], element.reason)
        raise RecordFormatError(
            f"{_MAX_CONSECUTIVE_MALFORMED} malformed records in a row (last in "
            f"{self._paths[element.dataset]}, record {element.index}: {element.reason}); is this a "
            "dataset written by `esm3-jax preprocess` with this version?"
        )

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "malformed_records": self._malformed}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._malformed = state["malformed_records"]


class _SkipMalformed(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, dataset_paths: tuple[str, ...]):
        super().__init__(parent)
        self._paths = dataset_paths

    def __iter__(self) -> _SkipMalformedIterator:
        return _SkipMalformedIterator(self._parent.__iter__(), self._paths)


@dataclasses.dataclass(frozen=True)
class _ColumnLayout:
    """Packs a protein's ~22 per-position arrays into 3 (L, C) column blocks, one per dtype.

    Grain's packer costs Python work per feature per protein; three blocks instead of 22 arrays
    cut packing + batching from ~330 to ~140 us of CPU per protein. `split` undoes the join on
    whole batches and writes each field's own padding value (the packer pads a block with one
    value) where sequence_id is 0.
    """

    fields: dict[str, Field]

    @functools.cached_property
    def groups(self) -> dict[str, list[tuple[str, int, int]]]:
        out: dict[str, list[tuple[str, int, int]]] = {}
        for name, field in self.fields.items():
            cols = out.setdefault(np.dtype(field.dtype).name, [])
            start = cols[-1][2] if cols else 0
            cols.append((name, start, start + int(np.prod(field.trailing, dtype=np.int64))))
        return out

    def join(self, example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        length = len(example["sequence_tokens"])
        return {
            group: np.concatenate([example[name].reshape(length, -1) for name, _, _ in cols], axis=1)
            for group, cols in self.groups.items()
        }

    def split(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sequence_id = batch["int32_segment_ids"]
        padding = sequence_id == 0
        out = {}
        for group, cols in self.groups.items():
            block = batch[group]
            for name, start, stop in cols:
                trailing, pad = self.fields[name].trailing, self.fields[name].pad
                value = np.ascontiguousarray(block[:, :, start:stop]).reshape(*block.shape[:2], *trailing)
                value[padding] = pad
                out[name] = value
        out["sequence_id"] = sequence_id
        return out


class _SplitColumns(grain.transforms.Map):
    def __init__(self, layout: _ColumnLayout):
        self._layout = layout

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._layout.split(batch)


def _resolve_hosts(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def _mark_absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags, which raises unless a program parsed them (an
    absl.app main does); this CLI uses argparse, so declare the defaults parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def build_dataset(
    cfg: DataConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    with_source: bool = False,
) -> grain.IterDataset:
    """This host's stream of batches: dicts of `BATCH_KEYS` numpy arrays, (batch_size/hosts, max_length, ...).

    `process_index`/`process_count` default to JAX's (set them to simulate hosts in tests).
    `num_epochs=None` repeats forever (training); a finite value ends the stream after that many
    passes over this host's slice, and `drop_remainder=False` then keeps the last short batch.
    `with_source=True` adds per-position `source_dataset` / `source_index` arrays.
    """
    if not cfg.datasets:
        raise ValueError("data.datasets is empty: list at least one folder written by `esm3-jax preprocess`")
    process_index, process_count = _resolve_hosts(process_index, process_count)
    if cfg.batch_size % process_count:
        raise ValueError(f"data.batch_size {cfg.batch_size} does not divide over {process_count} hosts")
    local_batch = cfg.batch_size // process_count

    per_dataset = []
    for d, spec in enumerate(cfg.datasets):
        ds = grain.MapDataset.source(open_source(spec.path)).map_with_index(_TagIndex(d))
        if len(ds) < process_count:
            raise ValueError(f"{spec.path}: {len(ds)} records cannot be split over {process_count} hosts")
        ds = ds[process_index::process_count]
        if cfg.shuffle:  # index_shuffle reseeds per epoch, so each epoch has its own order
            ds = ds.shuffle(seed=(cfg.seed + 7919 * d) % 2**32)
        per_dataset.append(ds.repeat(num_epochs))
    ds = per_dataset[0]
    if len(per_dataset) > 1:
        ds = grain.MapDataset.mix(per_dataset, weights=[spec.weight for spec in cfg.datasets])
    layout = _ColumnLayout({**_FIELDS, **(_SOURCE_FIELDS if with_source else {})})
    ds = ds.random_map(_ToExample(cfg, layout), seed=(cfg.seed + 1) % 2**32)

    read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=4 * local_batch)
    it_ds = _SkipMalformed(ds.to_iter_dataset(read), tuple(spec.path for spec in cfg.datasets))
    it_ds = FirstFitPackIterDataset(
        it_ds,
        length_struct={group: cfg.max_length for group in layout.groups},
        num_packing_bins=local_batch,
        shuffle_bins=False,  # the order is already shuffled; keep rows reproducible
        max_sequences_per_bin=None if cfg.packing else 1,
    )
    it_ds = it_ds.batch(local_batch, drop_remainder=drop_remainder).map(_SplitColumns(layout))
    if cfg.worker_count > 0:
        _mark_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    return it_ds


def make_iterator(cfg: DataConfig, **kwargs) -> grain.DatasetIterator:
    """`iter(build_dataset(cfg, **kwargs))`: supports get_state/set_state and orbax's grain handler."""
    return iter(build_dataset(cfg, **kwargs))


def malformed_count(state_or_iterator) -> int:
    """How many malformed records the iterator has skipped so far (summed over grain workers)."""
    state = state_or_iterator.get_state() if hasattr(state_or_iterator, "get_state") else state_or_iterator

    def walk(node) -> int:
        if isinstance(node, dict):
            return int(node.get("malformed_records", 0)) + sum(
                walk(v) for k, v in node.items() if k != "malformed_records"
            )
        if isinstance(node, (list, tuple)):
            return sum(walk(v) for v in node)
        return 0

    return walk(state)
