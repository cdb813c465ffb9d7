"""`esm3-jax aot`: compile the real train step for a TPU slice that is not here (needs `pip install libtpu`).

The step is lowered with abstract (shape-only) state and batch carrying the shardings the run
would use, and compiled by libtpu for the named topology. The compiled program reports per-chip
memory (arguments, outputs, temporaries).

FLOPs come from the optimized HLO that libtpu dumps: every dot and convolution, each counted as
many times as it runs (a while-loop body times its trip count). XLA's own cost analysis is
reported too, but it counts every while-loop body once, and the compiled step has two kinds of
loops: the scanned layers, and the windowed einsums (collective matmuls) that SPMD makes of an
FSDP matmul on larger slices, where the all-gather of the weight or the reduce-scatter of its
gradient is interleaved with the matmul, one pair of shards per iteration. On v5p-64 a
windowed matmul is an 8-iteration loop, so cost analysis sees an eighth of it.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import math
import os
import re
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from esm3_jax import batch as batch_lib
from esm3_jax.model import geom_kernel
from esm3_jax.model.flops import train_flops_per_token
from esm3_jax.train import sharding as shd
from esm3_jax.train.config import Config, load_config
from esm3_jax.train.setup import setup_training

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
    """The run's batch as shapes with their shardings: what the train step is compiled for."""
    return batch_lib.abstract_batch(cfg.data.batch_size, cfg.data.max_length,
                                    lambda ndim: NamedSharding(mesh, shd.batch_spec(rules, ndim)))


def _compile(cfg: Config, devices, dump_dir: str | None = None) -> Any:
    if not cfg.model.geom_chunk_bytes:
        # The kernel's default follows the default backend, the CPU here; compile the TPU's.
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, geom_chunk_bytes=geom_kernel.default_chunk_bytes(devices[0].platform)))
    run = setup_training(cfg, devices)
    batch = abstract_batch(cfg, run.mesh, run.rules)
    step = run.train_step({k: v.sharding for k, v in batch.items()})
    # The dump is the only way to the optimized HLO here: compiled.as_text() fails to read back
    # libtpu's module (jaxlib 0.10.2 rejects its async-update instructions).
    options = {"xla_dump_to": dump_dir, "xla_dump_hlo_as_text": True} if dump_dir else None
    return run.mesh, run.param_count, step.lower(run.abstract_state_with_shardings(), batch).compile(compiler_options=options)


def _flops(compiled) -> float:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", 0.0))


# --- Matmul FLOPs of an optimized HLO module (text form), loops counted by their trip counts ---

_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.*)$")
_ARRAY = re.compile(r"^\w+\[([\d,]*)\]")


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis that closes the one at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] == "("
        depth -= text[i] == ")"
        if depth == 0:
            return i + 1
    raise ValueError(f"unbalanced parentheses in {text[:200]!r}")


def parse_hlo(text: str) -> tuple[dict[str, dict[str, dict]], str]:
    """{computation: {instruction: {shape, op, operands, args, attrs, root}}} and the entry's name."""
    comps: dict[str, dict[str, dict]] = {}
    cur, entry = None, None
    for line in text.splitlines():
        if cur is None:
            m = _HEADER.match(line)
            if m:
                cur = comps.setdefault(m.group(2), {})
                entry = m.group(2) if m.group(1) else entry
            continue
        if line == "}":
            cur = None
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        rest = m.group(3)
        # The result shape: one token, or a parenthesised tuple (whose layouts also hold parentheses).
        cut = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
        shape, rest = rest[:cut], rest[cut:].lstrip()
        op, _, _ = rest.partition("(")
        end = _balanced(rest, len(op))
        args = rest[len(op) + 1:end - 1]
        cur[m.group(2)] = dict(shape=shape, op=op, operands=re.findall(r"%([\w.\-]+)", args), args=args,
                               attrs=rest[end:], root=bool(m.group(1)))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _dims(shape: str) -> list[int]:
    m = _ARRAY.match(shape)
    if m is None:
        raise ValueError(f"not an array shape: {shape[:80]!r}")
    return [int(d) for d in m.group(1).split(",") if d]


def _dot_flops(inst: dict, comp: dict) -> int:
    lhs = _dims(comp[inst["operands"][0]]["shape"])
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst["attrs"])
    k = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m else 1
    return 2 * math.prod(_dims(inst["shape"])) * k


def _conv_flops(inst: dict, comp: dict) -> int:
    """2 x multiply-adds that touch real input: SPMD and the TPU compiler express batched dots as
    convolutions with padded, dilated windows, where most window positions hit padding."""
    lhs, rhs = (_dims(comp[o]["shape"]) for o in inst["operands"][:2])
    out = _dims(inst["shape"])
    lhs_l, rhs_l, out_l = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst["attrs"]).groups()
    m = re.search(r"window=\{([^}]*)\}", inst["attrs"])
    window = dict(kv.split("=") for kv in m.group(1).split()) if m else {}
    n_spatial = sum(c.isdigit() for c in rhs_l)

    def field(key: str, default: int) -> list[int]:
        return [int(x) for x in window[key].split("x")] if key in window else [default] * n_spatial

    stride, lhs_dil, rhs_dil = field("stride", 1), field("lhs_dilate", 1), field("rhs_dilate", 1)
    pad_lo = [int(p.split("_")[0]) for p in window["pad"].split("x")] if "pad" in window else [0] * n_spatial
    pairs = 1  # (output position, kernel position) pairs that read a real input element
    for s in range(n_spatial):
        size_in, size_k, size_out = lhs[lhs_l.index(str(s))], rhs[rhs_l.index(str(s))], out[out_l.index(str(s))]
        pos = np.arange(size_out)[:, None] * stride[s] + np.arange(size_k)[None, :] * rhs_dil[s] - pad_lo[s]
        pairs *= int(((pos >= 0) & (pos <= (size_in - 1) * lhs_dil[s]) & (pos % lhs_dil[s] == 0)).sum())
    m = re.search(r"batch_group_count=(\d+)", inst["attrs"])
    batch = lhs[lhs_l.index("b")] // (int(m.group(1)) if m else 1)
    return 2 * batch * rhs[rhs_l.index("i")] * rhs[rhs_l.index("o")] * pairs


def _constant(comp: dict, name: str) -> int | None:
    inst = comp[name]
    while inst["op"] in ("copy", "bitcast", "convert") and inst["operands"]:
        inst = comp[inst["operands"][0]]
    return int(inst["args"]) if inst["op"] == "constant" and re.fullmatch(r"-?\d+", inst["args"]) else None


def _trip_count(comps: dict, comp: dict, inst: dict) -> int | None:
    """A while loop's iterations: XLA's known_trip_count, else `i < N` (or <=) in the condition
    with i's start in the loop's initial tuple and `i + step` in the body's result."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst["attrs"])
    if m:
        return int(m.group(1))
    cond = comps[re.search(r"condition=%([\w.\-]+)", inst["attrs"]).group(1)]
    body = comps[re.search(r"body=%([\w.\-]+)", inst["attrs"]).group(1)]
    compare = next(i for i in cond.values() if i["root"])
    direction = re.search(r"direction=(\w+)", compare["attrs"])
    if compare["op"] != "compare" or direction is None or direction.group(1) not in ("LT", "LE"):
        return None
    index, limit = cond[compare["operands"][0]], _constant(cond, compare["operands"][1])
    if index["op"] != "get-tuple-element" or limit is None:
        return None
    k = int(re.search(r"index=(\d+)", index["attrs"]).group(1))
    init_tuple = comp[inst["operands"][0]]
    start = _constant(comp, init_tuple["operands"][k]) if init_tuple["op"] == "tuple" else None
    update = body[next(i for i in body.values() if i["root"])["operands"][k]]
    steps = [_constant(body, o) for o in update["operands"]] if update["op"] == "add" else []
    step = next((c for c in steps if c), None)
    if start is None or step is None or step <= 0:
        return None
    return max(0, math.ceil((limit - start + (direction.group(1) == "LE")) / step))


def _computation_runs(comps: dict, entry: str) -> tuple[collections.Counter, list[str]]:
    """How often each computation runs per call of the entry, and the while loops whose trip
    count could not be read (their bodies counted once)."""
    calls: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    unknown = []
    for cname, comp in comps.items():
        for iname, inst in comp.items():
            if inst["op"] == "while":
                n = _trip_count(comps, comp, inst)
                if n is None:
                    unknown.append(iname)
                body = re.search(r"body=%([\w.\-]+)", inst["attrs"]).group(1)
                calls[cname].append((body, 1 if n is None else n))  # the condition holds no matmuls
            else:  # fusions, calls, async wrappers, conditional branches, reducers
                calls[cname] += [(c, 1) for c in re.findall(r"%([\w.\-]+)", inst["attrs"]) if c in comps]
    # How often each computation runs: push counts down the call graph in topological order.
    callers = collections.Counter(c for edges in calls.values() for c, _ in edges)
    runs = collections.Counter({entry: 1})
    ready = [c for c in comps if callers[c] == 0]
    while ready:
        c = ready.pop()
        for callee, n in calls[c]:
            runs[callee] += runs[c] * n
            callers[callee] -= 1
            if callers[callee] == 0:
                ready.append(callee)
    return runs, unknown


def hlo_matmul_flops(text: str) -> tuple[float, list[str]]:
    """FLOPs of every dot and convolution in an optimized HLO module, each times the number of
    times its computation runs; and the while loops whose trip count could not be read (their
    bodies counted once, so the total is then a lower bound)."""
    comps, entry = parse_hlo(text)
    runs, unknown = _computation_runs(comps, entry)
    total = 0
    for cname, comp in comps.items():
        for inst in comp.values():
            if runs[cname] and inst["op"] in ("dot", "convolution"):
                total += runs[cname] * (_dot_flops if inst["op"] == "dot" else _conv_flops)(inst, comp)
    return float(total), unknown


def hlo_kernel_calls(text: str) -> int:
    """Calls per step of hand-written TPU kernels (Mosaic custom calls, e.g. splash attention):
    their matmuls are invisible to the count above."""
    comps, entry = parse_hlo(text)
    runs, _ = _computation_runs(comps, entry)
    return sum(runs[c] for c, comp in comps.items() for inst in comp.values()
               if inst["op"] == "custom-call" and 'custom_call_target="tpu_custom_call"' in inst["attrs"])


def _dumped_module(dump_dir: str) -> str:
    """The optimized HLO text of the one module compiled with `dump_dir` as its dump folder."""
    files = glob.glob(os.path.join(dump_dir, "*.after_optimizations.txt"))
    if len(files) != 1:
        raise AotError(f"expected one optimized HLO module in {dump_dir}, found {len(files)}")
    with open(files[0]) as f:
        return f.read()


_OOM = re.compile(r"HLO temporaries \(([\d.]+)([GMK])\) exceeds available HBM \(([\d.]+)([GMK])\)")


def _to_bytes(value: str, unit: str) -> float:
    return float(value) * {"G": GiB, "M": 2**20, "K": 2**10}[unit]


def run_aot(cfg: Config, topology: str, *, progress=lambda msg: None) -> dict[str, Any]:
    """Compile the train step for `topology`; returns the numbers the CLI prints."""
    topo, devices = topology_devices(topology)
    n = len(devices)
    progress(f"compiling the train step for {topology} ({n} chips)...")
    out: dict[str, Any] = {"topology": topology, "libtpu_topology": topo.libtpu_name, "chips": n,
                           "hbm_per_chip": topo.hbm_bytes}
    t0 = time.time()
    # libtpu writes the optimized HLO here; only the matmul count below reads it.
    with tempfile.TemporaryDirectory(prefix="esm3_aot_hlo_") as dump_dir:
        try:
            mesh, n_params, compiled = _compile(cfg, devices, dump_dir)
        except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED ... CompileTimeHbmOom
            msg = str(e)
            if "CompileTimeHbmOom" not in msg and "RESOURCE_EXHAUSTED" not in msg:
                raise
            m = _OOM.search(msg)
            run = setup_training(cfg, devices)
            out.update(fits=False, compile_s=time.time() - t0, mesh=shd.mesh_summary(run.mesh),
                       params=run.param_count, error=msg.splitlines()[0][:400])
            if m:
                out.update(temp_bytes=_to_bytes(m.group(1), m.group(2)), hbm_reported=_to_bytes(m.group(3), m.group(4)))
            return out
        hlo_text = _dumped_module(dump_dir)
    out["compile_s"] = time.time() - t0
    out["mesh"] = shd.mesh_summary(mesh)
    out["params"] = n_params
    ma = compiled.memory_analysis()
    total = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
    out.update(argument_bytes=ma.argument_size_in_bytes, output_bytes=ma.output_size_in_bytes,
               alias_bytes=ma.alias_size_in_bytes, temp_bytes=ma.temp_size_in_bytes, total_bytes=total,
               fits=total <= topo.hbm_bytes)
    out["flops_per_chip_xla"] = _flops(compiled)
    out["flops_per_chip"], out["loops_without_trip_count"] = hlo_matmul_flops(hlo_text)
    out["kernel_calls"] = hlo_kernel_calls(hlo_text)
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
        unknown = r["loops_without_trip_count"]
        bound = f"; at least: {len(unknown)} loops of unknown trip count counted once" if unknown else ""
        if r.get("kernel_calls"):
            bound += (f"; at least: the matmuls inside {r['kernel_calls']} hand-written kernel calls "
                      f"(e.g. splash attention) are not counted")
        lines.append(
            f"FLOPs per step per chip: {r['flops_per_chip']:.4g} in the compiled program's matmuls "
            f"(every dot and convolution of the optimized HLO, loop bodies times their trip counts, "
            f"remat recomputation included{bound}), analytic {r['analytic_flops_per_chip']:.4g} "
            f"(ratio {r['flops_per_chip'] / r['analytic_flops_per_chip']:.2f}); XLA cost analysis "
            f"{r['flops_per_chip_xla']:.4g} (counts each while-loop body once: scanned layers, windowed einsums)")
    else:
        temp = f"temporaries {r['temp_bytes'] / GiB:.2f} GiB > " if "temp_bytes" in r else ""
        lines.append(f"per-chip memory: {temp}HBM {r['hbm_per_chip'] / GiB:.2f} GiB (CompileTimeHbmOom: {r['error']})")
    lines.append(f"fits: {'yes' if r['fits'] else 'no'}")
    return "\n".join(lines)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (model, data, train, mesh)")
    parser.add_argument("--topology", default="",
                        help=f"TPU slice, one of: {', '.join(TOPOLOGIES)} (default: the config's mesh.topology)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def cli_main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    topology = args.topology or cfg.mesh.topology
    if not topology:
        raise AotError(f"{args.config}: no mesh.topology in the config; name the slice with --topology")
    if topology not in TOPOLOGIES:
        raise AotError(f"unknown topology {topology!r}; known: {', '.join(TOPOLOGIES)}")
    progress = lambda msg: print(msg, file=sys.stderr, flush=True)
    print(format_report(run_aot(cfg, topology, progress=progress)))
    return 0
