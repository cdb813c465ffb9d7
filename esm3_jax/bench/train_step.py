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


def bench_train_step_against_torch(config: str, batch: int, length: int, steps: int, overrides: tuple[str, ...] = (),
                                   torch_modes: tuple[str, ...] = ("eager", "compile"),
                                   loss_rtol: float = 1e-4, min_update_agreement: float = 0.999) -> dict:
    """The JAX train step against the PyTorch alternative (bench/torch_peer.py): the reference
    ESM3 at the same config with the same weights (its random init, converted), the same batch
    (every track, coordinates, the same masked positions) and the same objective and update rule,
    in torch eager mode and/or under torch.compile. fp32 on both sides, torch on as many threads as
    this process may use (XLA:CPU's pool is that size too).

    The first step of each is checked before anything is timed: the losses must agree to
    `loss_rtol`, and after it the parameters must have moved alike (the share of elements whose
    updates agree to 1% of the learning rate, at least `min_update_agreement`). Then `steps`
    rounds, one step of each per round in turn, so that the machine's drift slows all alike;
    each side's figure is its median step.
    """
    import os

    import torch

    from esm3_jax.bench import torch_peer
    from esm3_jax.compat.esm3_weights import esm3_params_to_torch, infer_esm3_config, torch_to_esm3_params
    from esm3_jax.compat.reference import build_reference_esm3
    from esm3_jax.runtime.hardware import matmul_peak_flops
    from esm3_jax.train.state import state_from_params

    if not torch_modes or any(m not in ("eager", "compile") for m in torch_modes):
        raise ValueError(f"torch modes must be among eager, compile; got {torch_modes}")
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    # warmup_steps=0: the first step runs at the peak learning rate, so that the parameter check
    # after it compares real updates (a warmup from 0 would move nothing).
    cfg = load_config(resolve_config_path(config),
                      [*overrides, "train.grad_accum_steps=1", "train.seed=0", "train.warmup_steps=0",
                       "model.compute_dtype=float32"])
    mcfg = cfg.model
    if mcfg.n_layers_geom != 1 or mcfg.ffn_expansion != 8 / 3 or not mcfg.scale_residue:
        raise ValueError(f"config {config}: the reference ESM3 has one geometric block, SwiGLU 8/3 and residue "
                         f"scaling; this config differs ({mcfg})")
    ref_model, ref_state = build_reference_esm3(mcfg.d_model, mcfg.n_heads, mcfg.v_heads, mcfg.n_layers)
    conv_cfg = infer_esm3_config(ref_state, mcfg.n_heads, scan_layers=mcfg.scan_layers)
    params = torch_to_esm3_params(ref_state, conv_cfg)
    run = setup_training(cfg, jax.devices()[:1])
    host = synthetic_train_batch(batch, length)
    bsh = run.batch_shardings(host)
    jax_step = run.train_step(bsh)
    x = {k: jax.device_put(v, bsh[k]) for k, v in host.items()}
    state = state_from_params(jax.device_put(params, run.state_shardings.params), run.tx, 0, run.state_shardings)
    tokens = batch * length
    flops = train_flops_per_token(mcfg, length) * tokens
    print(f"config {config}: d_model {mcfg.d_model}, {mcfg.n_layers} layers, {mcfg.param_count():,} params; "
          f"batch {batch} x {length}, every track + coordinates, float32; JAX {jax.__version__} "
          f"({jax.devices()[0].platform}), torch {torch.__version__} ({torch.get_num_threads()} threads)")

    # First steps: compile, and check that the two sides compute the same thing.
    (state, m), jax_compile_s = torch_peer.timed(lambda: jax_step(state, x))
    jax_loss = float(m["loss"])
    jax_after = esm3_params_to_torch(jax.tree.map(np.asarray, state.params), conv_cfg)
    decay = torch_peer.decay_flags(params, cfg.train.no_decay_patterns, conv_cfg)
    tbatch = torch_peer.torch_batch(host)
    lr0 = float(torch_peer_lr(cfg, 0))
    # Each mode trains its own copy, taken before any step: every first step starts from the same weights.
    models = {mode: copy_module(ref_model) for mode in torch_modes}
    peers, checks, results = {}, {}, {}
    for mode in torch_modes:
        peers[mode] = torch_peer.TorchTrainStep(models[mode], tbatch, cfg, decay, compile=mode == "compile")
        first_loss, first_s = torch_peer.timed(peers[mode])
        after = {k: v for k, v in peers[mode].state_numpy().items() if k in jax_after}
        agreement = torch_peer.update_agreement({k: ref_state[k] for k in after}, jax_after, after, lr0)
        rel = abs(first_loss - jax_loss) / abs(jax_loss)
        checks[mode] = dict(loss=first_loss, loss_relative_difference=rel, first_step_s=first_s, **agreement)
        print(f"first step, torch {mode}: loss {first_loss:.6f} vs esm3-jax {jax_loss:.6f} (relative difference "
              f"{rel:.1e}); after AdamW, {100 * agreement['update_agreement']:.3f}% of parameter updates agree to "
              f"1% of lr (largest difference {agreement['update_max_diff_in_lr']:.2f} lr); "
              f"{first_s:.1f} s{' incl. compile' if mode == 'compile' else ''}")
        if rel > loss_rtol or agreement["update_agreement"] < min_update_agreement:
            raise RuntimeError(f"torch {mode} and esm3-jax disagree on the first step: loss {first_loss} vs {jax_loss}, "
                               f"{agreement}")
    # One untimed step more each: the first run after compiling also faults in fresh pages, and
    # torch.compile may specialise again on the second call.
    state, m = jax_step(state, x)
    jax.block_until_ready(m)
    for peer in peers.values():
        peer()
    peak = matmul_peak_flops("float32", repeats=3)
    times: dict[str, list[float]] = {"esm3-jax": [], **{f"torch {mode}": [] for mode in peers}}
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = jax_step(state, x)
        jax.block_until_ready(m)
        times["esm3-jax"].append(time.perf_counter() - t0)
        for mode, peer in peers.items():
            times[f"torch {mode}"].append(torch_peer.timed(peer)[1])
    peak = max(peak, matmul_peak_flops("float32", repeats=3))
    print(f"matmul rate (XLA, float32, 2048^3, best before/after the rounds): {peak / 1e9:.1f} GFLOP/s; "
          f"model FLOPs per step {flops / 1e9:.1f} GFLOP")
    jax_s = float(np.median(times["esm3-jax"]))
    for name, ts in times.items():
        sec = float(np.median(ts))
        results[name] = dict(step_s=sec, tokens_per_s=tokens / sec, mfu=flops / sec / peak, times=ts)
        extra = f", compile {jax_compile_s:.1f} s" if name == "esm3-jax" else ""
        print(f"{name:14s}: {sec:7.2f} s/step (median of {steps}{extra}), {tokens / sec:8.1f} tokens/s, "
              f"MFU {100 * flops / sec / peak:.1f}%")
    for mode in peers:
        ts = times[f"torch {mode}"]
        ratio = float(np.median(ts)) / jax_s
        results[f"torch {mode}"].update(speedup=ratio, **checks[mode])
        print(f"speedup esm3-jax / torch {mode}: {ratio:.2f}x (medians); per round: "
              + " ".join(f"{b / a:.2f}" for a, b in zip(times["esm3-jax"], ts)))
    results["esm3-jax"].update(loss=jax_loss, compile_s=jax_compile_s)
    return dict(results=results, tokens=tokens, flops_per_step=flops, peak=peak, threads=threads)


def torch_peer_lr(cfg, step: int) -> float:
    from esm3_jax.train.optim import learning_rate_schedule

    return float(learning_rate_schedule(cfg.train)(step))


def copy_module(model):
    import copy

    return copy.deepcopy(model)
