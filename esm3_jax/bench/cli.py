"""`esm3-jax bench ...`: speed measured side by side, never assumed.

Every benchmark prints (1) esm3-jax against the reference implementation on identical config,
weights and inputs, measured in the same process, and (2) model FLOP utilisation against the
machine's matmul rate, measured in the same run with the same dtype.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from esm3_jax.runtime import allocator
from esm3_jax.runtime import cpu_matmul
from esm3_jax import tokens as T

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def resolve_config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / f"{name_or_path}.yaml", CONFIG_DIR / name_or_path):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"config '{name_or_path}': no such file, and no configs/{name_or_path}.yaml")


def time_fn(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_rates(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """An n^3 matmul's sustained rate (FLOP/s) through XLA, per matmul library on the CPU
    (`esm3_jax.runtime.cpu_matmul`: Eigen and YNNPACK differ by up to 20% here), else one entry "xla"."""
    dt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.key(0), (n, n), dt)
    b = jax.random.normal(jax.random.key(1), (n, n), dt)
    platform = jax.default_backend()
    libraries = cpu_matmul.LIBRARIES if platform == "cpu" else ("xla",)
    rates = {}
    for lib in libraries:
        options = cpu_matmul.compiler_options(platform, lib) if platform == "cpu" else None
        f = jax.jit(lambda a, b: a @ b, compiler_options=options)
        rates[lib] = 2 * n**3 / time_fn(lambda: f(a, b).block_until_ready(), repeats, warmup=2)
    return rates


def matmul_peak_flops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """The machine's matmul peak (FLOP/s) through XLA: the fastest library's rate."""
    return max(matmul_rates(dtype, n, repeats).values())


def random_inputs(batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Every track filled, plus backbone coordinates (a random walk at protein-like spacing)."""
    rng = np.random.default_rng(seed)
    B, L = batch, length
    seq = rng.integers(4, 24, size=(B, L)).astype(np.int32)
    seq[:, 0], seq[:, -1] = T.SEQUENCE_BOS, T.SEQUENCE_EOS
    ca = np.cumsum(rng.normal(size=(B, L, 3)) * 2.2, axis=1)
    coords = np.stack([ca + rng.normal(size=ca.shape), ca, ca + rng.normal(size=ca.shape)], axis=2)
    ra = rng.integers(0, T.RESIDUE_VOCAB_SIZE, size=(B, L, 16))
    ra[rng.random((B, L, 16)) < 0.9] = 0
    return dict(
        sequence_tokens=seq,
        structure_tokens=rng.integers(0, 4096, size=(B, L)).astype(np.int32),
        ss8_tokens=rng.integers(3, 11, size=(B, L)).astype(np.int32),
        sasa_tokens=rng.integers(3, 19, size=(B, L)).astype(np.int32),
        function_tokens=rng.integers(0, 260, size=(B, L, 8)).astype(np.int32),
        residue_annotation_tokens=ra.astype(np.int32),
        average_plddt=np.full((B, L), 0.9, np.float32),
        per_res_plddt=rng.random((B, L)).astype(np.float32),
        structure_coords=coords.astype(np.float32),
        chain_id=np.zeros((B, L), np.int32),
        sequence_id=np.ones((B, L), np.int32),
    )


def bench_forward(config: str, batch: int, length: int, repeats: int, reference: bool = True) -> dict:
    """esm3-jax vs the reference forward on identical config, weights and inputs.

    The two are timed in alternating rounds and each keeps its best round, so a machine that is
    busy for a while slows both alike; the matmul peak is re-measured alongside and its best kept.
    """
    import flax.linen as nn

    from esm3_jax.train.config import load_config
    from esm3_jax.model.flops import forward_flops_per_token
    from esm3_jax.model.esm3 import ESM3, init_params

    cfg = load_config(resolve_config_path(config)).model
    dtype = jnp.dtype(cfg.dtype).name
    inputs = random_inputs(batch, length)
    tokens = batch * length
    flops = forward_flops_per_token(cfg, length) * tokens
    print(f"config {config}: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
          f"{cfg.v_heads} geometric heads, {cfg.param_count():,} params; batch {batch} x {length}, "
          f"every track + coordinates, {dtype}, {jax.devices()[0].platform}")

    if reference:
        from esm3_jax.compat.esm3_weights import infer_esm3_config, torch_to_esm3_params
        from esm3_jax.compat.reference import build_reference_esm3, reference_forward, to_torch_inputs

        ref_model, state = build_reference_esm3(cfg.d_model, cfg.n_heads, cfg.v_heads, cfg.n_layers)
        # Same weights on both sides: the reference's random init, converted.
        params = torch_to_esm3_params(state, infer_esm3_config(state, cfg.n_heads, compute_dtype=cfg.compute_dtype))
    else:
        params = nn.unbox(init_params(cfg, jax.random.key(0)))
    model = ESM3(cfg)
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, **x),
                  compiler_options=cpu_matmul.compiler_options(jax.default_backend(), cpu_matmul.DEFAULT))
    x = {k: jnp.asarray(v) for k, v in inputs.items()}
    t_compile = time.perf_counter()
    ours = jax.tree.map(np.asarray, fwd(params, x))
    t_compile = time.perf_counter() - t_compile
    run_ours = lambda: jax.block_until_ready(fwd(params, x))
    result: dict = {}
    if reference:
        import torch

        tin = to_torch_inputs(inputs)
        theirs = reference_forward(ref_model, inputs)
        err = max(float(np.max(np.abs(ours[k] - theirs[k])) / np.max(np.abs(theirs[k]))) for k in theirs)

        def run_ref():
            with torch.no_grad():
                ref_model(**tin)

        run_ref()
    run_ours()
    peak, best, best_ref = 0.0, float("inf"), float("inf")
    for _ in range(repeats):
        peak = max(peak, matmul_peak_flops(dtype, repeats=2))
        best = min(best, time_fn(run_ours, 1, warmup=0))
        if reference:
            best_ref = min(best_ref, time_fn(run_ref, 1, warmup=0))
    print(f"matmul peak (XLA, {dtype}, 2048^3, best of {repeats}): {peak / 1e9:.1f} GFLOP/s")
    print(f"esm3-jax : {tokens / best:9.1f} tokens/s  ({best * 1e3:.0f} ms/batch, compile {t_compile:.1f} s, "
          f"{flops / best / 1e9:.1f} GFLOP/s, MFU {100 * flops / best / peak:.1f}%)")
    result.update(jax_tokens_per_s=tokens / best, jax_mfu=flops / best / peak, peak=peak)
    if reference:
        result.update(reference_tokens_per_s=tokens / best_ref, reference_mfu=flops / best_ref / peak,
                      speedup=best_ref / best, max_relative_error=err)
        print(f"reference: {tokens / best_ref:9.1f} tokens/s  ({best_ref * 1e3:.0f} ms/batch, "
              f"{flops / best_ref / 1e9:.1f} GFLOP/s, MFU {100 * flops / best_ref / peak:.1f}%; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads)")
        print(f"speedup esm3-jax / reference: {best_ref / best:.2f}x over {repeats} alternating rounds "
              f"(outputs agree: max relative error {err:.1e})")
    return result


def synthetic_train_batch(batch: int, length: int, mask_rate: float = 0.3, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch in the training contract's format: every track filled, ~30% of positions masked."""
    rng = np.random.default_rng(seed)
    x = random_inputs(batch, length, seed)
    out = dict(x)
    masks = {}
    for track, key, mask_value in (
        ("sequence", "sequence_tokens", T.SEQUENCE_MASK), ("structure", "structure_tokens", T.STRUCTURE_MASK),
        ("ss8", "ss8_tokens", 0), ("sasa", "sasa_tokens", 0), ("function", "function_tokens", 0),
        ("residue_annotation", "residue_annotation_tokens", 0),
    ):
        m = rng.random((batch, length)) < mask_rate
        m[:, 0] = m[:, -1] = False
        masks[track] = m
        out[f"{track}_target"] = x[key]
        out[f"{track}_loss_mask"] = m
        mm = m if x[key].ndim == 2 else m[..., None]
        out[key] = np.where(mm, mask_value, x[key]).astype(np.int32)
    out["structure_coords"] = np.where(masks["structure"][..., None, None], np.nan, x["structure_coords"]).astype(np.float32)
    return out


def _compiled_train_step(config: str, overrides: tuple[str, ...], batch: int, length: int) -> dict:
    """The real jitted train step on one device, compiled and run twice (untimed), with its state and batch."""
    from esm3_jax.train.config import load_config
    from esm3_jax.model.esm3 import ESM3
    from esm3_jax.train import sharding as shd
    from esm3_jax.train.optim import make_optimizer
    from esm3_jax.train.state import create_state, state_shardings
    from esm3_jax.train.step import jit_train_step, make_train_step

    cfg = load_config(resolve_config_path(config), list(overrides))
    mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1])
    rules = cfg.mesh.rules.as_flax_rules()
    model = ESM3(cfg.model)
    tx = make_optimizer(cfg.train)
    _, shardings = state_shardings(model, tx, mesh, rules)
    state = create_state(model, tx, 0, shardings)
    host = synthetic_train_batch(batch, length)
    bsh = shd.batch_shardings(host, mesh, rules)
    step = jit_train_step(
        make_train_step(model, tx, loss_weights=cfg.train.loss_weights.as_dict(), grad_accum_steps=1, mesh=mesh, rules=rules),
        shardings, bsh, mesh, rules, cpu_matmul=cfg.train.cpu_matmul,
    )
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
    from esm3_jax.model.flops import train_flops_per_token

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


def bench_data(data_dir: str, config: str, n_batches: int) -> dict:
    from esm3_jax.train.config import load_config
    from esm3_jax.bench.data import bench_pipeline

    cfg = load_config(resolve_config_path(config))
    p = bench_pipeline(data_dir, cfg.data, n_batches)
    print(f"pipeline ({data_dir}, one worker, batch {cfg.data.batch_size} x {cfg.data.max_length}, "
          f"packing {cfg.data.packing}): {p['records_per_s']:.0f} records/s, {p['tokens_per_s']:.0f} tokens/s "
          f"({p['padded_tokens_per_s']:.0f} padded tokens/s, rows {100 * p['row_fill']:.0f}% full)")
    t = bench_train_step(config, cfg.data.batch_size, cfg.data.max_length, steps=3, verbose=False)
    ratio = p["padded_tokens_per_s"] / t["tokens_per_s"]
    print(f"train step ({config}, same batch shape): {t['tokens_per_s']:.0f} tokens/s")
    print(f"pipeline / train step: {ratio:.1f}x  ({'ok' if ratio >= 20 else 'BELOW'} the 20x target)")
    p.update(train_tokens_per_s=t["tokens_per_s"], ratio=ratio)
    return p


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    f = sub.add_parser("forward", help="ESM3 forward pass vs the reference (tokens/s, ratio, MFU)")
    f.add_argument("--config", default="mid", help="config name under configs/ or a path (default mid)")
    f.add_argument("--batch", type=int, default=4)
    f.add_argument("--length", type=int, default=256)
    f.add_argument("--repeats", type=int, default=5)
    f.add_argument("--no-reference", action="store_true", help="skip the reference (no torch needed)")
    t = sub.add_parser("train-step", help="full ESM3 train step: FLOPs per step, step time, MFU")
    t.add_argument("--config", default="small")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--length", type=int, default=512)
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--against", nargs="+", metavar="KEY=VALUE",
                   help="also time a step with these overrides, alternating with the first in one process")
    t.add_argument("overrides", nargs="*", help="config overrides, e.g. model.remat=full")
    v = sub.add_parser("vqvae", help="VQ-VAE encoding and decoding vs the reference (residues/s, ratios)")
    v.add_argument("--chains", type=int, default=8)
    v.add_argument("--length", type=int, default=256)
    v.add_argument("--repeats", type=int, default=3)
    d = sub.add_parser("data", help="input pipeline tokens/s next to the train step's, same run")
    d.add_argument("--data", required=True, help="a folder of shards written by `esm3-jax preprocess`")
    d.add_argument("--config", default="small")
    d.add_argument("--batches", type=int, default=50)


def cli_main(args: argparse.Namespace) -> int:
    if args.what == "forward":
        bench_forward(args.config, args.batch, args.length, args.repeats, not args.no_reference)
    elif args.what == "train-step":
        bench_train_step(args.config, args.batch, args.length, args.steps, tuple(args.overrides),
                         against=tuple(args.against) if args.against else None)
    elif args.what == "vqvae":
        from esm3_jax.bench.vqvae import bench_vqvae

        bench_vqvae(args.chains, args.length, repeats=args.repeats)
    elif args.what == "data":
        bench_data(args.data, args.config, args.batches)
    return 0
