"""`esm3-jax bench train-step`: the real jitted train step (every track, every head, geometric
attention) timed on one device, its MFU against the matmul rate measured next to every step, and
optionally a second variant of the config timed in alternation with it."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from esm3_jax.batch import synthetic_train_batch
from esm3_jax.model.flops import train_flops_per_token
from esm3_jax.runtime import allocator
from esm3_jax.runtime.hardware import matmul_rates
from esm3_jax.train.config import load_config, resolve_config_path
from esm3_jax.train.setup import setup_training


def _compiled_train_step(config: str, overrides: tuple[str, ...], batch: int, length: int) -> dict:
    """The real jitted train step on one device, compiled and run twice (untimed), with its state and batch."""
    # One step per batch: the bench times the step itself, whatever the config's accumulation.
    cfg = load_config(resolve_config_path(config), [*overrides, "train.grad_accum_steps=1", "train.seed=0"])
    run = setup_training(cfg, jax.devices()[:1])
    state = run.fresh_state()
    host = synthetic_train_batch(batch, length)
    bsh = run.batch_shardings(host)
    step = run.train_step(bsh)
    x = {k: jax.device_put(v, bsh[k]) for k, v in host.items()}
    t0 = time.perf_counter()
    state, m = step(state, x)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    # One untimed step more: the first run after compiling also faults in the temporaries' pages.
    state, m = step(state, x)
    jax.block_until_ready(m)
    return dict(cfg=cfg, step=step, state=state, metrics=m, x=x, compile_s=compile_s, times=[])


def bench_train_step(config: str, batch: int, length: int, steps: int, overrides: tuple[str, ...] = (),
                     peak: float | None = None, verbose: bool = True, against: tuple[str, ...] | None = None) -> dict:
    """Time the real jitted train step (all tracks, all heads, geometric attention) on one device.

    `against`: more overrides for a second step, compiled alongside and timed in alternation with
    the first (one step each per round), so that both see the same machine; its result is
    returned under "against". A shared VM's speed drifts by 10-35% within minutes, more than most
    changes worth measuring.
    """
    variants = {"run": tuple(overrides)}
    if against is not None:
        variants["against"] = tuple(overrides) + tuple(against)
    labels = {name: " ".join(ov) or "as configured" for name, ov in variants.items()}
    runs = {name: _compiled_train_step(config, ov, batch, length) for name, ov in variants.items()}
    cfg = runs["run"]["cfg"]
    mcfg = cfg.model
    dtype = jnp.dtype(mcfg.dtype).name
    measure_peak = peak is None
    tokens = batch * length
    # Per variant: an `against` override may change the model (layers, widths, geometric blocks).
    flops_of = {name: train_flops_per_token(r["cfg"].model, length) * tokens for name, r in runs.items()}
    # The matmul rate is measured before the first round and after every round, and each step is
    # held against the faster of the two rates measured next to it; the run's best rate gives the
    # most conservative figure too.
    best_by_library: dict[str, float] = {}

    def measure() -> float:
        rates = matmul_rates(dtype)
        for lib, rate in rates.items():
            best_by_library[lib] = max(best_by_library.get(lib, 0.0), rate)
        return max(rates.values())

    peaks = [measure()] if measure_peak else []
    for _ in range(steps):
        for r in runs.values():
            t0 = time.perf_counter()
            r["state"], r["metrics"] = r["step"](r["state"], r["x"])
            jax.block_until_ready(r["metrics"])
            r["times"].append(time.perf_counter() - t0)
        if measure_peak:
            peaks.append(measure())
    if measure_peak:
        peak = max(peaks)
    results = {}
    for name, r in runs.items():
        times, flops = r["times"], flops_of[name]
        sec = float(np.median(times))
        if measure_peak:
            mfu = float(np.median([flops / t / max(a, b) for t, a, b in zip(times, peaks, peaks[1:])]))
        else:
            mfu = flops / sec / peak
        results[name] = dict(step_s=sec, tokens_per_s=tokens / sec, flops_per_step=flops, mfu=mfu,
                             mfu_vs_best_peak=flops / sec / peak, peak=peak, compile_s=r["compile_s"],
                             loss=float(r["metrics"]["loss"]), config=r["cfg"])
    if verbose:
        platform = jax.devices()[0].platform
        print(f"config {config}: d_model {mcfg.d_model}, {mcfg.n_layers} layers, {mcfg.param_count():,} params; "
              f"batch {batch} x {length}, {dtype}, remat {mcfg.remat}, scan_layers {mcfg.scan_layers}, "
              f"{platform}, host allocator {allocator.active()}")
        if measure_peak:
            libs = ", ".join(f"{lib} {rate / 1e9:.1f}" for lib, rate in best_by_library.items())
            print(f"matmul rate (XLA, {dtype}, 2048^3, the fastest library), measured before the steps and after "
                  f"each round: {min(peaks) / 1e9:.1f}-{max(peaks) / 1e9:.1f} GFLOP/s (best per library: {libs})")
        else:
            print(f"matmul peak (given): {peak / 1e9:.1f} GFLOP/s")
        if len(set(flops_of.values())) == 1:
            counts = f"{flops_of['run'] / 1e9:.1f} GFLOP"
        else:
            counts = ", ".join(f"{flops_of[name] / 1e9:.1f} GFLOP [{labels[name]}]" for name in runs)
        print(f"model FLOPs per step: {counts} (6N-style analytic count incl. attention)")
        for name, res in results.items():
            flops = res["flops_per_step"]
            label = "train step" if against is None else f"train step [{labels[name]}]"
            matmuls = f"; plain matmuls through {runs[name]['cfg'].train.cpu_matmul}" if platform == "cpu" else ""
            print(f"{label}: {res['step_s'] * 1e3:.0f} ms (median of {steps}, compile {res['compile_s']:.1f} s), "
                  f"{res['tokens_per_s']:.0f} tokens/s, {flops / res['step_s'] / 1e9:.1f} GFLOP/s{matmuls}")
            if measure_peak:
                print(f"  MFU {100 * res['mfu']:.1f}% (median over the steps, each against the faster matmul rate "
                      f"measured next to it); {100 * res['mfu_vs_best_peak']:.1f}% against the run's best rate")
            else:
                print(f"  MFU {100 * res['mfu']:.1f}%")
        if against is not None:
            print(f"step time, [{labels['against']}] / [{labels['run']}]: "
                  f"{results['against']['step_s'] / results['run']['step_s']:.3f} (medians); per round: "
                  + " ".join(f"{b / a:.3f}" for a, b in zip(runs["run"]["times"], runs["against"]["times"])))
    out = results["run"]
    if against is not None:
        out["against"] = results["against"]
    return out
