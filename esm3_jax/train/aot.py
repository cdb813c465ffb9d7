"""`esm3-jax aot`: compile the real train step for a TPU slice that is not here (needs `pip install libtpu`).

The step is lowered with abstract (shape-only) state and batch carrying the shardings the run
would use, and compiled by libtpu for the named topology. The compiled program reports per-chip
memory (arguments, outputs, temporaries) and FLOPs. XLA's cost analysis counts the body of a
`lax.scan` once; the scanned layers are corrected for by compiling the same width unscanned at
one and two plain layers and adding (layers - 1) times the difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from esm3_jax.config import Config, load_config
from esm3_jax.flops import train_flops_per_token
from esm3_jax.model.esm3 import ESM3
from esm3_jax.train import optim, sharding as shd, state as state_lib, step as step_lib

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Topology:
    libtpu_name: str  # libtpu's own topology string, e.g. "v5:4x4x8"
    chip_config: str  # "megacore" (v4/v5p: one device per chip) or "default"
    chips_per_host: tuple[int, int, int]  # libtpu wants 3 numbers, also for 2D slices
    wrap: tuple[bool, bool, bool]
    hbm_bytes: int  # per chip


def _v5p(n_cores: int, shape: tuple[int, int, int]) -> tuple[str, Topology]:
    # A v5p-N slice has N TensorCores = N/2 chips; a 3D torus wraps along axes of length >= 4.
    name = "v5:" + "x".join(map(str, shape))
    wrap = tuple(s >= 4 and min(shape) >= 4 for s in shape)
    return f"v5p-{n_cores}", Topology(name, "megacore", (2, 2, 1), wrap, int(95.74 * GiB))


def _v4(n_cores: int, shape: tuple[int, int, int]) -> tuple[str, Topology]:
    name = "v4:" + "x".join(map(str, shape))
    wrap = tuple(s >= 4 and min(shape) >= 4 for s in shape)
    return f"v4-{n_cores}", Topology(name, "megacore", (2, 2, 1), wrap, 32 * GiB)


def _v5e(n_chips: int, shape: tuple[int, int]) -> tuple[str, Topology]:
    return f"v5e-{n_chips}", Topology("v5e:" + "x".join(map(str, shape)), "default", (2, 2, 1), (False,) * 3, 16 * GiB)


def _v6e(n_chips: int, shape: tuple[int, int]) -> tuple[str, Topology]:
    return f"v6e-{n_chips}", Topology("v6e:" + "x".join(map(str, shape)), "default", (2, 2, 1), (False,) * 3, 32 * GiB)


# Common slice names -> libtpu topologies (AOT_NOTES.md: libtpu rejects the marketing names).
TOPOLOGIES: dict[str, Topology] = dict(
    [
        _v5p(8, (2, 2, 1)), _v5p(16, (2, 2, 2)), _v5p(32, (2, 2, 4)), _v5p(64, (4, 4, 2)),
        _v5p(128, (4, 4, 4)), _v5p(256, (4, 4, 8)), _v5p(512, (4, 8, 8)), _v5p(1024, (8, 8, 8)),
        _v5p(2048, (8, 8, 16)),
        _v4(8, (2, 2, 1)), _v4(16, (2, 2, 2)), _v4(32, (2, 2, 4)), _v4(64, (4, 4, 2)), _v4(128, (4, 4, 4)),
        _v4(256, (4, 4, 8)),
        _v5e(4, (2, 2)), _v5e(8, (2, 4)), _v5e(16, (4, 4)), _v5e(32, (4, 8)), _v5e(64, (8, 8)),
        _v5e(128, (8, 16)), _v5e(256, (16, 16)),
        _v6e(4, (2, 2)), _v6e(8, (2, 4)), _v6e(16, (4, 4)), _v6e(32, (4, 8)), _v6e(64, (8, 8)),
        _v6e(128, (8, 16)), _v6e(256, (16, 16)),
    ]
)


class AotError(ValueError):
    pass


def topology_devices(name: str) -> tuple[Topology, list]:
    if name not in TOPOLOGIES:
        raise AotError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - jax always has it
        raise AotError(f"jax.experimental.topologies is unavailable: {e}") from e
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise AotError("AOT compilation for TPU needs libtpu: pip install libtpu")
    topo = TOPOLOGIES[name]
    # Only libtpu's compiler is used, never a chip: do not let libtpu's one-process-per-host lock
    # (held by a training run, or an earlier compile in the same test session) stop it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topo.libtpu_name, chip_config_name=topo.chip_config,
        chips_per_host_bounds=topo.chips_per_host, num_slices=1, wrap=topo.wrap,
    )
    return topo, list(desc.devices)


def abstract_batch(cfg: Config, mesh, rules) -> dict[str, jax.ShapeDtypeStruct]:
    B, L = cfg.data.batch_size, cfg.data.max_length
    # The contract's shapes: model inputs as state.example_inputs makes them, targets like inputs.
    batch = {k: ((B, L) + v.shape[2:], v.dtype) for k, v in state_lib.example_inputs(1, 1).items()}
    for track, inp in (("sequence", "sequence_tokens"), ("structure", "structure_tokens"), ("ss8", "ss8_tokens"),
                       ("sasa", "sasa_tokens"), ("function", "function_tokens"),
                       ("residue_annotation", "residue_annotation_tokens")):
        batch[f"{track}_target"] = batch[inp]
        batch[f"{track}_loss_mask"] = ((B, L), jnp.bool_)
    return {k: jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, shd.batch_spec(rules, len(s))))
            for k, (s, d) in batch.items()}


def _compile(cfg: Config, devices) -> Any:
    mesh = shd.make_mesh(cfg.mesh, devices)
    rules = cfg.mesh.rules.as_flax_rules()
    model = ESM3(cfg.model)
    tx = optim.make_optimizer(cfg.train)
    abstract, sh = state_lib.state_shardings(model, tx, mesh, rules)
    state = state_lib.abstract_with_shardings(abstract, sh)
    batch = abstract_batch(cfg, mesh, rules)
    step = step_lib.jit_train_step(
        step_lib.make_train_step(model, tx, loss_weights=cfg.train.loss_weights.as_dict(),
                                 grad_accum_steps=cfg.train.grad_accum_steps, mesh=mesh, rules=rules),
        sh, {k: v.sharding for k, v in batch.items()}, mesh, rules)
    return mesh, state_lib.param_count(abstract.params), step.lower(state, batch).compile()


def _flops(compiled) -> float:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", 0.0))


_OOM = re.compile(r"HLO temporaries \(([\d.]+)([GMK])\) exceeds available HBM \(([\d.]+)([GMK])\)")


def _to_bytes(value: str, unit: str) -> float:
    return float(value) * {"G": GiB, "M": 2**20, "K": 2**10}[unit]


def run_aot(cfg: Config, topology: str, *, correct_scan: bool = True, progress=lambda msg: None) -> dict[str, Any]:
    """Compile the train step for `topology`; returns the numbers the CLI prints."""
    topo, devices = topology_devices(topology)
    n = len(devices)
    progress(f"compiling the train step for {topology} ({n} chips)...")
    out: dict[str, Any] = {"topology": topology, "libtpu_topology": topo.libtpu_name, "chips": n,
                           "hbm_per_chip": topo.hbm_bytes}
    t0 = time.time()
    try:
        mesh, n_params, compiled = _compile(cfg, devices)
    except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED ... CompileTimeHbmOom
        msg = str(e)
        if "CompileTimeHbmOom" not in msg and "RESOURCE_EXHAUSTED" not in msg:
            raise
        m = _OOM.search(msg)
        mesh = shd.make_mesh(cfg.mesh, devices)
        abstract, _ = state_lib.state_shardings(ESM3(cfg.model), optim.make_optimizer(cfg.train), mesh,
                                                cfg.mesh.rules.as_flax_rules())
        out.update(fits=False, compile_s=time.time() - t0, mesh=shd.mesh_summary(mesh),
                   params=state_lib.param_count(abstract.params), error=msg.splitlines()[0][:400])
        if m:
            out.update(temp_bytes=_to_bytes(m.group(1), m.group(2)), hbm_reported=_to_bytes(m.group(3), m.group(4)))
        return out
    out["compile_s"] = time.time() - t0
    out["mesh"] = shd.mesh_summary(mesh)
    out["params"] = n_params
    ma = compiled.memory_analysis()
    total = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
    out.update(argument_bytes=ma.argument_size_in_bytes, output_bytes=ma.output_size_in_bytes,
               alias_bytes=ma.alias_size_in_bytes, temp_bytes=ma.temp_size_in_bytes, total_bytes=total,
               fits=total <= topo.hbm_bytes)
    flops_reported = _flops(compiled)
    out["flops_per_chip_reported"] = flops_reported
    n_plain = cfg.model.n_layers - cfg.model.n_layers_geom
    out["flops_per_chip"] = flops_reported
    if correct_scan and cfg.model.scan_layers and n_plain > 1:
        # One plain layer's FLOPs (fwd + bwd + remat) as XLA counts them: the same width unrolled
        # with two plain layers minus one plain layer. (Subtracting the scanned count instead is
        # not consistent: XLA treats remat differently inside and outside a loop.)
        progress("compiling 1- and 2-layer unscanned variants to count one layer's FLOPs...")
        shallow = []
        for k in (1, 2):
            m = dataclasses.replace(cfg.model, scan_layers=False, n_layers=cfg.model.n_layers_geom + k)
            shallow.append(_flops(_compile(dataclasses.replace(cfg, model=m), devices)[2]))
        out["flops_per_chip"] = flops_reported + (n_plain - 1) * (shallow[1] - shallow[0])
    tokens = cfg.data.batch_size * cfg.data.max_length
    out["analytic_flops_per_chip"] = train_flops_per_token(cfg.model, cfg.data.max_length) * tokens / n
    return out


def format_report(r: dict[str, Any]) -> str:
    lines = [f"topology: {r['topology']} (libtpu {r['libtpu_topology']}), {r['chips']} chips, "
             f"{r['hbm_per_chip'] / GiB:.2f} GiB HBM per chip",
             f"mesh: {r['mesh']}"]
    if "params" in r:
        lines.append(f"parameters: {r['params']:,}")
    lines.append(f"compile: {r['compile_s']:.1f}s")
    if "total_bytes" in r:
        lines.append(
            f"per-chip memory: arguments {r['argument_bytes'] / GiB:.2f} GiB, outputs {r['output_bytes'] / GiB:.2f} GiB, "
            f"aliased (donated) {r['alias_bytes'] / GiB:.2f} GiB, temporaries {r['temp_bytes'] / GiB:.2f} GiB; "
            f"total {r['total_bytes'] / GiB:.2f} GiB of {r['hbm_per_chip'] / GiB:.2f} GiB")
        lines.append(
            f"FLOPs per step per chip: {r['flops_per_chip']:.4g} from cost analysis "
            f"(raw {r['flops_per_chip_reported']:.4g}, scan body counted once, corrected), "
            f"analytic {r['analytic_flops_per_chip']:.4g} (ratio {r['flops_per_chip'] / r['analytic_flops_per_chip']:.2f})")
    else:
        temp = f"temporaries {r['temp_bytes'] / GiB:.2f} GiB > " if "temp_bytes" in r else ""
        lines.append(f"per-chip memory: {temp}HBM {r['hbm_per_chip'] / GiB:.2f} GiB (CompileTimeHbmOom: {r['error']})")
    lines.append(f"fits: {'yes' if r['fits'] else 'no'}")
    return "\n".join(lines)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (model, data, train, mesh)")
    parser.add_argument("--topology", required=True, help=f"TPU slice, one of: {', '.join(TOPOLOGIES)}")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--no-scan-correction", action="store_true",
                        help="skip the two shallow compiles that correct the FLOP count for scanned layers")


def cli_main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.topology not in TOPOLOGIES:
        raise AotError(f"unknown topology {args.topology!r}; known: {', '.join(TOPOLOGIES)}")
    progress = lambda msg: print(msg, file=sys.stderr, flush=True)
    print(format_report(run_aot(cfg, args.topology, correct_scan=not args.no_scan_correction, progress=progress)))
    return 0
