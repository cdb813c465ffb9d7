"""Input pipeline settings (ESM3_SPEC sections 1, 6, 7)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DataConfig:
    max_length: int = 256  # tokens per row, BOS/EOS included
    batch_size: int = 8  # global batch, rows
    seed: int = 0

    def validate(self) -> None:
        if self.max_length < 3:
            raise ValueError(f"data.max_length must be at least 3, got {self.max_length}")
        if self.batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive, got {self.batch_size}")
