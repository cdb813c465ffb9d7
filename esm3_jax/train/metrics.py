"""What a run reports besides the loss: the TensorBoard / W&B writers."""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

log = logging.getLogger(__name__)

class MetricWriter:
    """TensorBoard event files (tensorboardX), plus W&B when enabled and installed.

    Construct with logdir=None on every process but the first: one writer per run.
    """

    def __init__(self, logdir: str | None, *, wandb_project: str | None = None, config: Mapping | None = None):
        self._tb = None
        self._wandb = None
        if logdir is None:
            return
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(logdir)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                log.warning("train.wandb is on but wandb is not installed (pip install wandb); "
                            "logging to TensorBoard only")
            else:
                self._wandb = wandb.init(project=wandb_project, config=dict(config or {}), dir=logdir)

    def scalars(self, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
        # NaN marks "not measured in this batch" (e.g. a track with no masked position): skip it.
        clean = {f"{prefix}{k}": float(v) for k, v in values.items() if math.isfinite(float(v))}
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
