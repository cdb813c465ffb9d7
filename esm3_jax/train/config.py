"""Optimiser, schedule, checkpointing and device-mesh settings (ESM3_SPEC section 7)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    learning_rate: float = 4e-4
    seed: int = 0

    def validate(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"train.steps must be positive, got {self.steps}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1

    def validate(self) -> None:
        for name in ("fsdp", "tensor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"mesh.{name} must be positive, got {getattr(self, name)}")
