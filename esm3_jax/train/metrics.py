"""What a run reports besides the loss: MFU, and the TensorBoard / W&B writers."""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device (vendor datasheets), matched against `device.device_kind`
# by prefix. A v4/v5p device is one chip (megacore). CPUs have no entry: MFU is then not shown.
PEAK_BF16_FLOPS = (  # first match wins: "TPU v5 lite" (v5e) before "TPU v5" (v5p)
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("TPU v4", 275e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA A100", 312e12),
    ("NVIDIA B200", 2250e12),
)


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
    """The config's value when set, else the table's for this device kind, else None."""
    if override > 0:
        return override
    for prefix, flops in PEAK_BF16_FLOPS:
        if device_kind.startswith(prefix):
            return flops
    return None


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
