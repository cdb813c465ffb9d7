"""`esm3-jax scaling --ladder LADDER.yaml`: a scaling ladder, held-out NLL against training FLOPs.

A ladder YAML (configs/scaling/*.yaml) names a base training config, the train and held-out record
folders, a list of model sizes, a token-budget rule (tokens = k * params^p), the batch and length,
and the fractions of each run's budget at which it is evaluated. For each size, in order:

1. train it to its budget with the ordinary train loop (`train.loop.train`; checkpoints, resume),
   its learning-rate schedule spanning the whole budget;
2. at each evaluation point, from inside the loop before that step's checkpoint is written, measure
   the held-out NLL per track at the training noise (`eval.nll.evaluate`, conditioning off: the
   same proteins, crops and masks at every point and for every size) and append it to
   <out>/<size>/evals.jsonl, and the whole table to <out>/ladder.csv.

Then over the compute frontier (per track: the points no cheaper point beats), fit
L(C) = a * C^-b + c with scipy's curve_fit, with a bootstrap interval on b and R^2, and write
fit.json and ladder.png (every size's curve, NLL against FLOPs on a log axis, and the fitted
frontier: the shape of the ESM3 paper's Figure 1D).

Resumable: a size with <out>/<size>/done.json is not rerun; an interrupted one resumes from its
latest checkpoint (points it already evaluated are kept). `--fit-only` refits what is recorded.
Training FLOPs are the model's analytic count (`model.flops.train_flops_per_token`: every matmul
of the trunk, attention, geometric sublayer and all six heads, forward + backward) times the
positions processed (steps x batch x length; rows are packed); 6*N*T is recorded beside it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from esm3_jax.config import ConfigError, from_dict, to_dict

# Tracks a sequence + SS8 corpus labels; any other track with held-out labels is recorded too.
CSV_FIELDS = ("size", "params", "d_model", "n_layers", "n_heads", "step", "steps", "tokens", "flops",
              "flops_6nt", "wall_s")
DONE = "done.json"
EVALS = "evals.jsonl"
PLAN = "plan.json"


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    d_model: int
    n_layers: int
    n_heads: int
    v_heads: int = 0  # 0: max(4, d_model // 8)
    learning_rate: float = 0.0  # 0: the base config's

    def validate(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"size name {self.name!r} must be a non-empty folder name")


@dataclasses.dataclass(frozen=True)
class Budget:
    """tokens = k * params^p, rounded up to whole steps (and to a multiple of the eval grid)."""

    k: float = 20.0
    p: float = 1.0
    min_steps: int = 40

    def validate(self) -> None:
        if self.k <= 0 or self.p < 0:
            raise ValueError(f"budget: k must be positive and p >= 0, got k={self.k} p={self.p}")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    batches: int = 16  # held-out batches of data.batch_size rows at each point
    seed: int = 0  # the held-out data seed: crops and masks, the same at every point
    fractions: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0)  # of each run's budget

    def validate(self) -> None:
        if self.batches <= 0:
            raise ValueError(f"eval.batches must be positive, got {self.batches}")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions) or 1.0 not in self.fractions:
            raise ValueError(f"eval.fractions must lie in (0, 1] and include 1, got {list(self.fractions)}")


@dataclasses.dataclass(frozen=True)
class FitSettings:
    tracks: tuple[str, ...] = ("sequence", "ss8")  # tracks to fit and plot
    bootstrap: int = 1000
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Ladder:
    train_data: str
    valid_data: str
    sizes: tuple[Size, ...]
    base_config: str = "tiny"
    overrides: tuple[str, ...] = ()  # key=value, for every size (before the ladder's own)
    batch_size: int = 16
    max_length: int = 128
    warmup_fraction: float = 0.05
    budget: Budget = dataclasses.field(default_factory=Budget)
    eval: EvalSettings = dataclasses.field(default_factory=EvalSettings)
    fit: FitSettings = dataclasses.field(default_factory=FitSettings)
    out: str = "runs/ladder"

    def validate(self) -> None:
        if not self.sizes:
            raise ValueError("sizes: list at least one model size")
        names = [s.name for s in self.sizes]
        if len(set(names)) != len(names):
            raise ValueError(f"sizes: names must be unique, got {names}")
        for s in self.sizes:
            s.validate()
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        self.budget.validate()
        self.eval.validate()


def load_ladder(path: str | Path, *, out: str | None = None, train_data: str | None = None,
                valid_data: str | None = None) -> Ladder:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ladder {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    for key, value in (("out", out), ("train_data", train_data), ("valid_data", valid_data)):
        if value is not None:
            raw[key] = value
    try:
        ladder = from_dict(Ladder, raw, str(path))
        ladder.validate()
    except (ConfigError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from e
    return ladder


# --- the plan of one size --------------------------------------------------------------------------


def size_config(ladder: Ladder, size: Size, steps: int | None = None):
    """The train Config of `size` (steps=None: a placeholder, for the parameter count)."""
    from esm3_jax.train.config import load_config, resolve_config_path

    n_points = _grid(ladder.eval.fractions)
    steps = steps or max(ladder.budget.min_steps, 2 * n_points)
    out_dir = str(Path(ladder.out) / size.name)
    ov = [
        f"model.d_model={size.d_model}", f"model.n_layers={size.n_layers}", f"model.n_heads={size.n_heads}",
        f"model.v_heads={size.v_heads or max(4, size.d_model // 8)}",
        f"data.batch_size={ladder.batch_size}", f"data.max_length={ladder.max_length}",
        f"data.datasets=[{{path: '{ladder.train_data}'}}]",
        f"train.steps={steps}", f"train.warmup_steps={max(1, int(ladder.warmup_fraction * steps))}",
        f"train.output_dir='{out_dir}'", f"train.checkpoint_every={max(1, math.ceil(steps / 8))}",
        "train.keep_checkpoints=2", "train.eval_every=0", "train.resume=true",
        "train.init_from=''", "train.trainable=[]",
    ]  # fmt: skip
    if size.learning_rate:
        ov.append(f"train.learning_rate={size.learning_rate}")
    try:
        return load_config(resolve_config_path(ladder.base_config), [*ladder.overrides, *ov])
    except ConfigError as e:
        raise ValueError(f"size {size.name}: {e}") from e


def _grid(fractions: tuple[float, ...]) -> int:
    """The smallest n such that every fraction is a multiple of 1/n (checkpoints fall on every point)."""
    for n in range(1, 1025):
        if all(abs(f * n - round(f * n)) < 1e-9 for f in fractions):
            return n
    raise ValueError(f"eval.fractions {list(fractions)}: not multiples of 1/n for any n <= 1024")


def plan(ladder: Ladder, size: Size) -> dict[str, Any]:
    """Steps, tokens and FLOPs of `size` under the budget rule, and its evaluation steps."""
    from esm3_jax.model.flops import train_flops_per_token

    cfg = size_config(ladder, size)
    params = cfg.model.param_count()
    rows_tokens = ladder.batch_size * ladder.max_length
    n = _grid(ladder.eval.fractions)
    want_tokens = ladder.budget.k * params**ladder.budget.p
    steps = max(ladder.budget.min_steps, math.ceil(want_tokens / rows_tokens))
    steps = math.ceil(steps / n) * n
    cfg = size_config(ladder, size, steps)
    per_token = train_flops_per_token(cfg.model, ladder.max_length)
    eval_steps = sorted({round(f * steps) for f in ladder.eval.fractions})
    return {"size": size.name, "params": params, "d_model": size.d_model, "n_layers": size.n_layers,
            "n_heads": size.n_heads, "learning_rate": cfg.train.learning_rate, "steps": steps,
            "tokens": steps * rows_tokens, "flops_per_token": per_token, "flops": per_token * steps * rows_tokens,
            "eval_steps": eval_steps, "eval_batches": ladder.eval.batches, "eval_seed": ladder.eval.seed,
            "batch_size": ladder.batch_size, "max_length": ladder.max_length,
            "train_data": ladder.train_data, "valid_data": ladder.valid_data,
            "config": to_dict(cfg)}


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- training and evaluating one size ---------------------------------------------------------------


def run_size(ladder: Ladder, size: Size, index: int, say=print) -> dict:
    """Train `size` to its budget (resuming), evaluating at its points; returns its done.json."""
    import jax

    from esm3_jax.eval.nll import evaluate
    from esm3_jax.train.loop import train
    from esm3_jax.train.setup import setup_training

    p = plan(ladder, size)
    sdir = Path(ladder.out) / size.name
    done_path = sdir / DONE
    if done_path.is_file():
        done = json.loads(done_path.read_text())
        say(f"[{index}/{len(ladder.sizes)}] {size.name}: finished earlier ({done['wall_s']:.0f} s); skipped")
        return done
    sdir.mkdir(parents=True, exist_ok=True)
    plan_path = sdir / PLAN
    comparable = {k: v for k, v in p.items() if k != "config"}
    if plan_path.is_file():
        saved = {k: v for k, v in json.loads(plan_path.read_text()).items() if k != "config"}
        if saved != comparable:
            diff = {k: (saved.get(k), v) for k, v in comparable.items() if saved.get(k) != v}
            raise ValueError(f"{sdir}: begun under another plan (saved vs now: {diff}); "
                             "choose another --out, or delete that folder to start the size over")
    else:
        plan_path.write_text(json.dumps(p, indent=1) + "\n")
    cfg = size_config(ladder, size, p["steps"])
    evals_path = sdir / EVALS
    evaluated = {r["step"] for r in _read_jsonl(evals_path)}
    wall_before = max([r["wall_s"] for r in _read_jsonl(evals_path)] or [0.0])
    say(f"[{index}/{len(ladder.sizes)}] {size.name}: {p['params']:,} parameters (d_model {size.d_model}, "
        f"{size.n_layers} layers, {size.n_heads} heads), {p['steps']} steps = {p['tokens']:,} tokens = "
        f"{p['flops']:.3g} FLOPs; evaluated at steps {p['eval_steps']}")

    eval_data = dataclasses.replace(cfg.data, datasets=(dataclasses.replace(cfg.data.datasets[0],
                                                                            path=ladder.valid_data),),
                                    seed=ladder.eval.seed)
    eval_cfg = dataclasses.replace(cfg, data=eval_data)
    eval_run = setup_training(eval_cfg, jax.devices())
    cache: dict = {}
    t_start = time.time()
    # The train loop's wall time only: the run's own clock, minus the evaluations.
    eval_seconds = [0.0]

    def on_step(step: int, state) -> None:
        if step not in p["eval_steps"] or step in evaluated:
            return
        t0 = time.time()
        result = evaluate(eval_cfg, state.params, eval_run, ladder.eval.batches, progress=False,
                          conditioning=False, step_cache=cache)
        eval_seconds[0] += time.time() - t0
        nll = {r["target"]: r["nll"] for r in result["training_noise"] if r["nll"] is not None}
        row = {"step": step, "tokens": step * ladder.batch_size * ladder.max_length,
               "flops": p["flops_per_token"] * step * ladder.batch_size * ladder.max_length,
               "flops_6nt": 6.0 * p["params"] * step * ladder.batch_size * ladder.max_length,
               "wall_s": wall_before + (time.time() - t_start) - eval_seconds[0],
               "eval_s": time.time() - t0, "nll": nll,
               "unigram": {r["target"]: r["unigram_nll"] for r in result["training_noise"]
                           if r["unigram_nll"] is not None},
               "positions": {r["target"]: r["positions"] for r in result["training_noise"] if r["positions"]}}
        with evals_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        evaluated.add(step)
        say(f"  {size.name} step {step}/{p['steps']} ({row['flops']:.3g} FLOPs): held-out NLL "
            + " ".join(f"{t}={v:.4f}" for t, v in nll.items()) + f" (eval {row['eval_s']:.0f} s)")
        write_csv(ladder)

    result = train(cfg, on_step=on_step)
    if result.reason != "finished":
        raise KeyboardInterrupt(f"{size.name}: stopped at step {result.step} ({result.reason}); run again to resume")
    rows = _read_jsonl(evals_path)
    missing = [s for s in p["eval_steps"] if s not in {r["step"] for r in rows}]
    if missing:
        raise RuntimeError(f"{sdir}: no evaluation recorded at steps {missing}; delete {sdir} to rerun the size")
    done = {**{k: v for k, v in p.items() if k != "config"},
            "wall_s": max(r["wall_s"] for r in rows), "final_nll": rows[-1]["nll"]}
    done_path.write_text(json.dumps(done, indent=1) + "\n")
    say(f"  {size.name} done in {done['wall_s']:.0f} s of training")
    return done


# --- the table -------------------------------------------------------------------------------------


def collect(ladder: Ladder) -> list[dict]:
    """Every recorded evaluation point of every size, in ladder order."""
    out = []
    for size in ladder.sizes:
        sdir = Path(ladder.out) / size.name
        if not (sdir / PLAN).is_file():
            continue
        p = json.loads((sdir / PLAN).read_text())
        for r in sorted(_read_jsonl(sdir / EVALS), key=lambda r: r["step"]):
            out.append({"size": size.name, "params": p["params"], "d_model": p["d_model"],
                        "n_layers": p["n_layers"], "n_heads": p["n_heads"], "steps": p["steps"], **r})
    return out


def _tracks(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        for t in r["nll"]:
            if t not in seen:
                seen.append(t)
    return seen


def write_csv(ladder: Ladder) -> Path:
    rows = collect(ladder)
    tracks = _tracks(rows)
    path = Path(ladder.out) / "ladder.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*CSV_FIELDS, *(f"nll_{t}" for t in tracks), *(f"unigram_{t}" for t in tracks)])
        for r in rows:
            w.writerow([r[k] if not isinstance(r[k], float) else f"{r[k]:.8g}" for k in CSV_FIELDS]
                       + [f"{r['nll'][t]:.5f}" if t in r["nll"] else "" for t in tracks]
                       + [f"{r['unigram'][t]:.5f}" if t in r.get("unigram", {}) else "" for t in tracks])
    return path


# --- the fit ---------------------------------------------------------------------------------------


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower envelope: the points (C, L) that no point with C' <= C and L' <= L beats, by C."""
    out: list[tuple[float, float]] = []
    best = math.inf
    for c, loss in sorted(points, key=lambda x: (x[0], x[1])):
        if loss < best:
            out.append((c, loss))
            best = loss
    return out


def power_law(c, a, b, l_inf):
    return a * np.power(c, -b) + l_inf


def fit_power_law(c: np.ndarray, loss: np.ndarray) -> tuple[float, float, float]:
    """(a, b, c) of L = a * C^-b + c, least squares in L. C is scaled by its geometric mean inside,
    so the optimiser sees numbers near 1; `a` is returned for unscaled C."""
    from scipy.optimize import curve_fit

    c = np.asarray(c, float)
    loss = np.asarray(loss, float)
    c0 = float(np.exp(np.mean(np.log(c))))
    x = c / c0
    lo = float(loss.min())
    best = None
    # Several starting exponents: the objective has shallow valleys between b and the floor c.
    for b0 in (0.05, 0.2, 0.5, 1.0):
        p0 = (max(float(loss.max() - lo), 1e-3), b0, max(lo - 0.1, 0.0))
        try:
            popt, _ = curve_fit(power_law, x, loss, p0=p0, bounds=([0, 0, 0], [np.inf, 5.0, lo]), maxfev=20000)
        except RuntimeError:
            continue
        sse = float(np.sum((power_law(x, *popt) - loss) ** 2))
        if best is None or sse < best[0]:
            best = (sse, popt)
    if best is None:
        raise RuntimeError("curve_fit did not converge from any starting point")
    a_scaled, b, l_inf = (float(v) for v in best[1])
    return a_scaled * c0**b, b, l_inf


def r_squared(c, loss, a, b, l_inf) -> float:
    loss = np.asarray(loss, float)
    pred = power_law(np.asarray(c, float), a, b, l_inf)
    ss_tot = float(np.sum((loss - loss.mean()) ** 2))
    return 1.0 - float(np.sum((loss - pred) ** 2)) / ss_tot if ss_tot > 0 else float("nan")


def fit_frontier(points: list[tuple[float, float]], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The fit over `points`' frontier, with a 95% bootstrap interval on b (frontier points resampled)."""
    front = frontier(points)
    if len(front) < 4:
        return {"frontier": front, "note": f"only {len(front)} frontier points: too few for a 3-parameter fit"}
    c = np.array([p[0] for p in front])
    loss = np.array([p[1] for p in front])
    a, b, l_inf = fit_power_law(c, loss)
    rng = np.random.default_rng(seed)
    boots = []
    # With few points nearly every resample repeats the same 4-5 points: no interval worth the name.
    for _ in range(n_boot if len(front) >= 6 else 0):
        idx = rng.integers(0, len(c), len(c))
        if len(set(idx.tolist())) < 4:
            continue
        try:
            boots.append(fit_power_law(c[idx], loss[idx])[1])
        except RuntimeError:
            continue
    interval = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))] if boots else None
    return {"a": a, "b": b, "c": l_inf, "b_95": interval, "n_bootstrap": len(boots),
            "r2": r_squared(c, loss, a, b, l_inf), "frontier": [[float(x), float(y)] for x, y in front]}


def fit_and_plot(ladder: Ladder, say=print) -> dict[str, Any]:
    rows = collect(ladder)
    if not rows:
        raise ValueError(f"{ladder.out}: no evaluation recorded yet (run without --fit-only first)")
    out = Path(ladder.out)
    tracks = [t for t in ladder.fit.tracks if any(t in r["nll"] for r in rows)]
    sizes_done = [s.name for s in ladder.sizes if (out / s.name / DONE).is_file()]
    fits = {}
    for t in tracks:
        pts = [(r["flops"], r["nll"][t]) for r in rows if t in r["nll"]]
        fits[t] = fit_frontier(pts, ladder.fit.bootstrap, ladder.fit.seed)
        f = fits[t]
        if "b" in f:
            lo, hi = f["b_95"] or (float("nan"), float("nan"))
            say(f"fit {t}: L(C) = {f['a']:.4g} * C^-{f['b']:.4f} + {f['c']:.4f}  (b 95% bootstrap "
                f"[{lo:.4f}, {hi:.4f}], R^2 {f['r2']:.4f}, {len(f['frontier'])} frontier points)")
        else:
            say(f"fit {t}: {f['note']}")
    unigram = {t: float(np.mean([r["unigram"][t] for r in rows if t in r.get("unigram", {})]))
               for t in tracks if any(t in r.get("unigram", {}) for r in rows)}
    result = {"model": "L(C) = a * C^-b + c, C = training FLOPs (model count), L = held-out NLL (nats)",
              "flops": "model.flops.train_flops_per_token x steps x batch x length",
              "sizes_finished": sizes_done, "sizes": [s.name for s in ladder.sizes],
              "unigram_nll": unigram, "fits": fits}
    (out / "fit.json").write_text(json.dumps(result, indent=1) + "\n")
    write_csv(ladder)
    say(summary_table(ladder, rows, tracks))
    plot(ladder, rows, tracks, fits, unigram, out / "ladder.png")
    say(f"wrote {out / 'ladder.csv'}, {out / 'fit.json'}, {out / 'ladder.png'}")
    return result


def summary_table(ladder: Ladder, rows: list[dict], tracks: list[str]) -> str:
    """One markdown row per size: its last recorded point (marked when the size is unfinished)."""
    head = ["size", "params", "d_model x layers", "steps", "tokens", "training FLOPs", "6NT",
            *(f"held-out {t} NLL" for t in tracks), "train wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in ladder.sizes:
        mine = [r for r in rows if r["size"] == s.name]
        if not mine:
            continue
        r = mine[-1]
        done = (Path(ladder.out) / s.name / DONE).is_file()
        steps = f"{r['step']}" if done else f"{r['step']} of {r['steps']} (running)"
        lines.append("| " + " | ".join([
            s.name, f"{r['params'] / 1e6:.2f}M", f"{r['d_model']} x {r['n_layers']}", steps, f"{r['tokens']:,}",
            f"{r['flops']:.3g}", f"{r['flops_6nt']:.3g}",
            *(f"{r['nll'][t]:.4f}" if t in r["nll"] else "-" for t in tracks), f"{r['wall_s']:.0f}"]) + " |")
    return "\n".join(lines)


def plot(ladder: Ladder, rows, tracks, fits, unigram, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tracks), figsize=(6.2 * len(tracks), 4.6), squeeze=False)
    names = [s.name for s in ladder.sizes]
    cmap = plt.get_cmap("viridis")
    for ax, t in zip(axes[0], tracks):
        for i, name in enumerate(names):
            pts = [(r["flops"], r["nll"][t], r["params"]) for r in rows if r["size"] == name and t in r["nll"]]
            if not pts:
                continue
            color = cmap(i / max(1, len(names) - 1) * 0.9)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, ms=3.5, lw=1.4,
                    label=f"{name} ({pts[0][2] / 1e6:.2g}M)")
        f = fits.get(t, {})
        front = f.get("frontier", [])
        if front:
            ax.plot([p[0] for p in front], [p[1] for p in front], "o", mfc="none", mec="black", ms=7, mew=0.9,
                    label="compute frontier")
        if "b" in f:
            xs = np.geomspace(min(r["flops"] for r in rows), max(r["flops"] for r in rows), 200)
            interval = "b 95%: [{:.3f}, {:.3f}]".format(*f["b_95"]) if f["b_95"] else "no bootstrap (few points)"
            ax.plot(xs, power_law(xs, f["a"], f["b"], f["c"]), "--", color="crimson", lw=1.6,
                    label=f"fit: {f['a']:.3g} C^-{f['b']:.3f} + {f['c']:.3f}\n{interval}, R$^2$ {f['r2']:.3f}")
        if t in unigram:
            ax.axhline(unigram[t], color="grey", lw=0.8, ls=":", label=f"unigram {unigram[t]:.3f}")
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(f"held-out {t} NLL (nats, training noise)")
        ax.set_title(f"{t}")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7.5, loc="best")
    fig.suptitle(f"Scaling ladder: held-out NLL vs training compute ({Path(ladder.valid_data).name} split)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# --- CLI -------------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ladder", required=True, help="ladder YAML (e.g. configs/scaling/cpu_ladder.yaml)")
    parser.add_argument("--out", default=None, help="output folder (default: the ladder's `out`)")
    parser.add_argument("--train-data", default=None, help="train records folder (default: the ladder's)")
    parser.add_argument("--valid-data", default=None, help="held-out records folder (default: the ladder's)")
    parser.add_argument("--fit-only", action="store_true", help="train nothing: fit and plot what is recorded")
    parser.add_argument("--plan", action="store_true", help="print each size's parameters, steps, tokens and FLOPs; train nothing")


def cli_main(args: argparse.Namespace) -> int:
    import logging

    from esm3_jax.data.preprocess import MANIFEST

    ladder = load_ladder(args.ladder, out=args.out, train_data=args.train_data, valid_data=args.valid_data)
    if args.plan:
        total = 0.0
        for s in ladder.sizes:
            p = plan(ladder, s)
            total += p["flops"]
            print(f"{s.name:>8}: {p['params']:>11,} params  {p['steps']:>6} steps  {p['tokens']:>12,} tokens  "
                  f"{p['flops']:.3g} FLOPs  lr {p['learning_rate']:g}  eval at {p['eval_steps']}")
        print(f"total {total:.3g} training FLOPs")
        return 0
    if not args.fit_only:
        for what, d in (("train_data", ladder.train_data), ("valid_data", ladder.valid_data)):
            if not (Path(d) / MANIFEST).is_file():
                raise FileNotFoundError(f"{what} {d}: no {MANIFEST} (not a folder written by `esm3-jax preprocess`)")
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        Path(ladder.out).mkdir(parents=True, exist_ok=True)
        print(f"scaling ladder: {len(ladder.sizes)} sizes -> {ladder.out}; budget tokens = "
              f"{ladder.budget.k:g} * params^{ladder.budget.p:g}", flush=True)
        for i, size in enumerate(ladder.sizes, start=1):
            run_size(ladder, size, i, say=lambda *a: print(*a, flush=True))
    fit_and_plot(ladder)
    return 0
