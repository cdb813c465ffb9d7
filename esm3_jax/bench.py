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


def matmul_peak_flops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """The machine's sustained matmul rate (FLOP/s) through XLA, for the given dtype."""
    dt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.key(0), (n, n), dt)
    b = jax.random.normal(jax.random.key(1), (n, n), dt)
    f = jax.jit(lambda a, b: a @ b)
    sec = time_fn(lambda: f(a, b).block_until_ready(), repeats, warmup=2)
    return 2 * n**3 / sec


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
    import flax.linen as nn

    from esm3_jax.config import load_config
    from esm3_jax.convert import esm3_params_to_torch
    from esm3_jax.flops import forward_flops_per_token
    from esm3_jax.model.esm3 import ESM3, init_params

    cfg = load_config(resolve_config_path(config)).model
    inputs = random_inputs(batch, length)
    tokens = batch * length
    flops = forward_flops_per_token(cfg, length) * tokens
    print(f"config {config}: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
          f"{cfg.v_heads} geometric heads, {cfg.param_count():,} params; batch {batch} x {length}, "
          f"every track + coordinates, {jnp.dtype(cfg.dtype).name}, {jax.devices()[0].platform}")

    peak = matmul_peak_flops(jnp.dtype(cfg.dtype).name)
    print(f"matmul peak (XLA, {jnp.dtype(cfg.dtype).name}, 2048^3): {peak / 1e9:.1f} GFLOP/s")

    params = nn.unbox(init_params(cfg, jax.random.key(0)))
    model = ESM3(cfg)
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, **x))
    x = {k: jnp.asarray(v) for k, v in inputs.items()}
    t_compile = time.perf_counter()
    jax.block_until_ready(fwd(params, x))
    t_compile = time.perf_counter() - t_compile
    sec = time_fn(lambda: jax.block_until_ready(fwd(params, x)), repeats, warmup=1)
    result = {"jax_tokens_per_s": tokens / sec, "jax_mfu": flops / sec / peak}
    print(f"esm3-jax : {tokens / sec:9.1f} tokens/s  ({sec * 1e3:.0f} ms/batch, compile {t_compile:.1f} s, "
          f"{flops / sec / 1e9:.1f} GFLOP/s, MFU {100 * flops / sec / peak:.1f}%)")

    if reference:
        import torch

        from esm3_jax.convert import infer_esm3_config, torch_to_esm3_params
        from esm3_jax.reference import build_reference_esm3, reference_forward, to_torch_inputs

        ref_model, state = build_reference_esm3(cfg.d_model, cfg.n_heads, cfg.v_heads, cfg.n_layers)
        # Same weights on both sides: the reference's random init, converted.
        params = torch_to_esm3_params(state, infer_esm3_config(state, cfg.n_heads))
        tin = to_torch_inputs(inputs)
        with torch.no_grad():
            ref_sec = time_fn(lambda: ref_model(**tin), repeats, warmup=1)
        ours = jax.tree.map(np.asarray, fwd(params, x))
        theirs = reference_forward(ref_model, inputs)
        err = max(float(np.max(np.abs(ours[k] - theirs[k])) / np.max(np.abs(theirs[k]))) for k in theirs)
        sec = time_fn(lambda: jax.block_until_ready(fwd(params, x)), repeats, warmup=0)
        result.update(
            jax_tokens_per_s=tokens / sec, jax_mfu=flops / sec / peak,
            reference_tokens_per_s=tokens / ref_sec, reference_mfu=flops / ref_sec / peak,
            speedup=ref_sec / sec, max_relative_error=err,
        )
        print(f"reference: {tokens / ref_sec:9.1f} tokens/s  ({ref_sec * 1e3:.0f} ms/batch, "
              f"{flops / ref_sec / 1e9:.1f} GFLOP/s, MFU {100 * flops / ref_sec / peak:.1f}%; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads)")
        print(f"esm3-jax (same weights, re-timed): {tokens / sec:.1f} tokens/s, MFU {100 * flops / sec / peak:.1f}%")
        print(f"speedup esm3-jax / reference: {ref_sec / sec:.2f}x   (outputs agree: max relative error {err:.1e})")
    return result


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    f = sub.add_parser("forward", help="ESM3 forward pass vs the reference (tokens/s, ratio, MFU)")
    f.add_argument("--config", default="mid", help="config name under configs/ or a path (default mid)")
    f.add_argument("--batch", type=int, default=4)
    f.add_argument("--length", type=int, default=256)
    f.add_argument("--repeats", type=int, default=5)
    f.add_argument("--no-reference", action="store_true", help="skip the reference (no torch needed)")


def cli_main(args: argparse.Namespace) -> int:
    if args.what == "forward":
        bench_forward(args.config, args.batch, args.length, args.repeats, not args.no_reference)
    return 0
