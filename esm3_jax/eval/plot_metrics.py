"""`esm3-jax plot-metrics`: loss curves from a run's metrics.csv (train-vqvae writes one) as a PNG.

One panel per column, against `step`; several runs' CSVs overlay in the same panels, labelled by
their folder. matplotlib is optional (`pip install -e '.[plot]'`).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path


def read_metrics(path: Path) -> dict[str, list[float]]:
    """Columns of a metrics.csv as float lists (empty cells become NaN)."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "step" not in rows[0]:
        raise ValueError(f"{path}: not a metrics.csv (no rows, or no 'step' column)")
    cols = {k: [] for k in rows[0]}
    for i, row in enumerate(rows, start=2):
        for k in cols:
            v = row.get(k) or "nan"
            try:
                cols[k].append(float(v))
            except ValueError:
                raise ValueError(f"{path}: line {i}: column '{k}' is not a number: {v!r}") from None
    return cols


def _label(path: Path) -> str:
    """A run's name: its folder for runs/NAME/metrics.csv, else the file's stem."""
    return (path.parent.name or str(path)) if path.name == "metrics.csv" else path.stem


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` finite values (single-batch losses are noisy)."""
    out, buf = [], []
    for v in values:
        if math.isfinite(v):
            buf = (buf + [v])[-window:]
        out.append(sum(buf) / len(buf) if buf else math.nan)
    return out


def plot(csv_paths: list[Path], columns: list[str], out: Path, log_columns: set[str], smooth: int = 1) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no screen
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plot-metrics needs matplotlib: pip install -e '.[plot]'") from None
    runs = {p: read_metrics(p) for p in csv_paths}
    for p, cols in runs.items():
        missing = [c for c in columns if c not in cols]
        if missing:
            raise ValueError(f"{p}: no column(s) {', '.join(missing)}; it has {', '.join(cols)}")
    n = len(columns)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, col in zip(axes.flat, columns):
        for p, cols in runs.items():
            ax.plot(cols["step"], moving_average(cols[col], smooth), label=_label(p), linewidth=1.2)
        ax.set_title(col if smooth == 1 else f"{col} (mean of {smooth} rows)")
        ax.set_xlabel("step")
        if col in log_columns:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("csv", nargs="+", type=Path, help="metrics.csv files (several runs overlay)")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--columns", default="total,distance,direction,distogram,inverse_folding,codebook_perplexity",
                   help="comma-separated columns, one panel each")
    p.add_argument("--log", default="total,distance,direction", help="columns drawn on a log scale")
    p.add_argument("--smooth", type=int, default=1, help="trailing moving average over this many rows")


def cli_main(args: argparse.Namespace) -> int:
    columns = [c for c in args.columns.split(",") if c]
    for p in args.csv:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such metrics file")
    if args.smooth < 1:
        raise ValueError(f"--smooth must be >= 1, got {args.smooth}")
    out = plot(args.csv, columns, args.out, set(args.log.split(",")), args.smooth)
    print(f"wrote {out}")
    return 0
