"""Input pipeline settings (ESM3_SPEC sections 1, 6, 7)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from esm3_jax.data.noise import SCHEDULES

# Track names as used in configs, metrics and the batch contract.
NOISED_TRACKS = ("sequence", "structure", "coordinates", "ss8", "sasa", "function", "residue_annotation")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One ArrayRecord dataset folder (written by `esm3-jax preprocess`) and its mixture weight."""

    path: str
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
    """How each track is corrupted: per protein, a mask rate drawn from `<track>_schedule`, and
    with probability `<track>_dropout` the whole track of that protein is masked instead.

    Defaults: the paper's schedule/dropout table (ESM3_SPEC 7.2, [MEM], hence configurable).
    Flat fields so that one YAML key or `data.noise.structure_dropout=0.1` changes one knob.
    """

    sequence_schedule: str = "betalinear30"
    sequence_dropout: float = 0.0
    structure_schedule: str = "cosine"
    structure_dropout: float = 0.25
    # The geometric-attention input; also masked wherever structure tokens are (a superset).
    coordinates_schedule: str = "cubic"
    coordinates_dropout: float = 0.5
    ss8_schedule: str = "square_root"
    ss8_dropout: float = 0.9
    sasa_schedule: str = "square_root"
    sasa_dropout: float = 0.9
    function_schedule: str = "square_root"
    function_dropout: float = 0.9
    residue_annotation_schedule: str = "square_root"
    residue_annotation_dropout: float = 0.9
    # Whether a dropped-out track still carries a loss (like mask rate 1) or none. The paper does
    # not say; with dropout 0.9 on four tracks the choice matters, so it is a switch.
    loss_on_dropped_tracks: bool = True

    def schedule(self, track: str) -> str:
        return getattr(self, f"{track}_schedule")

    def dropout(self, track: str) -> float:
        return getattr(self, f"{track}_dropout")

    def validate(self) -> None:
        for track in NOISED_TRACKS:
            if self.schedule(track) not in SCHEDULES:
                raise ValueError(
                    f"data.noise.{track}_schedule: unknown schedule {self.schedule(track)!r}; "
                    f"known: {list(SCHEDULES)}"
                )
            if not 0.0 <= self.dropout(track) <= 1.0:
                raise ValueError(f"data.noise.{track}_dropout must be in [0, 1], got {self.dropout(track)}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    datasets: tuple[DatasetSpec, ...] = ()  # mixed by weight; each host reads a disjoint slice of each
    max_length: int = 256  # tokens per row, BOS/EOS included; longer proteins are cropped
    batch_size: int = 8  # global batch, rows (split evenly over hosts)
    seed: int = 0
    packing: bool = True  # several proteins per row (told apart by sequence_id), else one per row
    crop: Literal["random", "head"] = "random"  # where the window of a too-long protein starts
    shuffle: bool = True
    noise: NoiseConfig = dataclasses.field(default_factory=NoiseConfig)
    worker_count: int = 0  # grain worker processes; 0 = decode in the training process
    # Threads reading + decoding records ahead inside each process. 0 = in the consuming thread:
    # decoding is GIL-bound Python, so on local disks threads cost more than they hide (measured
    # 3.6k vs 1.9k records per CPU-second with 2); raise it for remote file systems.
    read_threads: int = 0

    def validate(self) -> None:
        if self.max_length < 3:
            raise ValueError(f"data.max_length must be at least 3, got {self.max_length}")
        if self.batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive, got {self.batch_size}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"data.seed must be in [0, 2**32), got {self.seed}")
        for i, spec in enumerate(self.datasets):
            if not spec.path:
                raise ValueError(f"data.datasets[{i}].path is empty")
            if not spec.weight > 0:
                raise ValueError(f"data.datasets[{i}].weight must be positive, got {spec.weight}")
        if self.worker_count < 0:
            raise ValueError(f"data.worker_count must be >= 0, got {self.worker_count}")
        if self.read_threads < 0:
            raise ValueError(f"data.read_threads must be >= 0, got {self.read_threads}")
        self.noise.validate()
