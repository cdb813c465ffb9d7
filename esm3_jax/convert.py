"""Official PyTorch state dicts <-> esm3-jax parameters (`esm3-jax convert`).

The mapping is a table of (torch key, flax path, layout) rows; each layout knows how to reshape a
torch tensor into the flax layout and back, so import and export are one table read two ways.
Model sizes are inferred from tensor shapes; only the head count needs a flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from esm3_jax import tokens as T
from esm3_jax.config import model_config_from_dict, to_dict
from esm3_jax.model.config import ModelConfig
from esm3_jax.params_io import load_params, save_params

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one tensor moves between torch (`to_flax`) and flax (`to_torch`)."""

    to_flax: Callable[[Array], Array]
    to_torch: Callable[[Array], Array]


SAME = Layout(lambda a: a, lambda a: a)
LINEAR = Layout(lambda a: a.T, lambda a: a.T)  # torch (out, in) <-> flax (in, out)


def kernel(in_dim: int, out_shape: tuple[int, ...]) -> Layout:
    """torch (prod(out_shape), in) <-> flax (in, *out_shape)."""
    return Layout(lambda a: a.T.reshape((in_dim, *out_shape)), lambda a: a.reshape(in_dim, -1).T)


def kernel_in(in_shape: tuple[int, ...], out_dim: int) -> Layout:
    """torch (out, prod(in_shape)) <-> flax (*in_shape, out)."""
    return Layout(lambda a: a.T.reshape((*in_shape, out_dim)), lambda a: a.reshape(-1, out_dim).T)


def reshaped(shape: tuple[int, ...]) -> Layout:
    return Layout(lambda a: a.reshape(shape), lambda a: a.reshape(-1))


Row = tuple[str, tuple[str, ...], Layout]


def block_rows(t: str, f: tuple[str, ...], cfg: ModelConfig, use_geom: bool) -> list[Row]:
    d, H, K, hid, vh = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.ffn_hidden, cfg.v_heads
    rows = [
        (f"{t}.attn.layernorm_qkv.0.weight", f + ("attn", "norm", "scale"), SAME),
        (f"{t}.attn.layernorm_qkv.0.bias", f + ("attn", "norm", "bias"), SAME),
        (f"{t}.attn.layernorm_qkv.1.weight", f + ("attn", "qkv"), kernel(d, (3, H, K))),
        (f"{t}.attn.q_ln.weight", f + ("attn", "q_norm", "scale"), reshaped((H, K))),
        (f"{t}.attn.k_ln.weight", f + ("attn", "k_norm", "scale"), reshaped((H, K))),
        (f"{t}.attn.out_proj.weight", f + ("attn", "out"), kernel_in((H, K), d)),
        (f"{t}.ffn.0.weight", f + ("ffn", "norm", "scale"), SAME),
        (f"{t}.ffn.0.bias", f + ("ffn", "norm", "bias"), SAME),
        (f"{t}.ffn.1.weight", f + ("ffn", "up"), kernel(d, (2, hid))),
        (f"{t}.ffn.3.weight", f + ("ffn", "down"), LINEAR),
    ]
    if use_geom:
        rows += [
            (f"{t}.geom_attn.s_norm.weight", f + ("geom_attn", "norm", "scale"), SAME),
            (f"{t}.geom_attn.proj.weight", f + ("geom_attn", "proj"), kernel(d, (5, vh, 3))),
            (f"{t}.geom_attn.out_proj.weight", f + ("geom_attn", "out"), kernel_in((vh, 3), d)),
            (f"{t}.geom_attn.distance_scale_per_head", f + ("geom_attn", "distance_scale"), SAME),
            (f"{t}.geom_attn.rotation_scale_per_head", f + ("geom_attn", "rotation_scale"), SAME),
        ]
    return rows


def esm3_rows(cfg: ModelConfig) -> tuple[list[Row], list[list[Row]]]:
    """(rows for unstacked tensors, per-layer rows for the scanned stack (empty if unscanned))."""
    rows: list[Row] = [
        ("encoder.sequence_embed.weight", ("encoder", "sequence_embed"), SAME),
        ("encoder.structure_tokens_embed.weight", ("encoder", "structure_embed"), SAME),
        ("encoder.ss8_embed.weight", ("encoder", "ss8_embed"), SAME),
        ("encoder.sasa_embed.weight", ("encoder", "sasa_embed"), SAME),
        ("encoder.plddt_projection.weight", ("encoder", "plddt_proj"), LINEAR),
        ("encoder.plddt_projection.bias", ("encoder", "plddt_proj_bias"), SAME),
        ("encoder.structure_per_res_plddt_projection.weight", ("encoder", "per_res_plddt_proj"), LINEAR),
        ("encoder.structure_per_res_plddt_projection.bias", ("encoder", "per_res_plddt_proj_bias"), SAME),
        ("encoder.residue_embed.weight", ("encoder", "residue_embed"), SAME),
        ("transformer.norm.weight", ("final_norm", "scale"), SAME),
    ]
    for name in ("sequence", "structure", "ss8", "sasa", "function", "residue"):
        t, f = f"output_heads.{name}_head", (f"{name}_head",)
        rows += [
            (f"{t}.0.weight", f + ("dense",), LINEAR),
            (f"{t}.0.bias", f + ("dense_bias",), SAME),
            (f"{t}.2.weight", f + ("norm", "scale"), SAME),
            (f"{t}.2.bias", f + ("norm", "bias"), SAME),
            (f"{t}.3.weight", f + ("out",), LINEAR),
            (f"{t}.3.bias", f + ("out_bias",), SAME),
        ]
    for i in range(cfg.n_layers_geom):
        rows += block_rows(f"transformer.blocks.{i}", ("trunk", f"geom_block_{i}"), cfg, True)
    stacked: list[list[Row]] = []
    for j in range(cfg.n_layers - cfg.n_layers_geom):
        t = f"transformer.blocks.{cfg.n_layers_geom + j}"
        if cfg.scan_layers:
            stacked.append(block_rows(t, ("trunk", "blocks", "block"), cfg, False))
        else:
            rows += block_rows(t, ("trunk", f"block_{j}"), cfg, False)
    return rows, stacked


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


FUNCTION_KEY = "encoder.function_embed.{}.weight"


def torch_to_esm3_params(state: dict[str, Array], cfg: ModelConfig) -> dict:
    """Flax parameter tree from an ESM3 state dict (values as numpy float32)."""
    state = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}
    rows, stacked = esm3_rows(cfg)
    expected = {r[0] for r in rows} | {r[0] for layer in stacked for r in layer}
    expected |= {FUNCTION_KEY.format(i) for i in range(T.FUNCTION_DEPTH)}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match an ESM3 of {cfg}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    params: dict = {}
    for key, path, layout in rows:
        _set(params, path, layout.to_flax(state[key]))
    if stacked:
        for i, (key, path, layout) in enumerate(stacked[0]):
            layers = [layout.to_flax(state[layer[i][0]]) for layer in stacked]
            _set(params, path, np.stack(layers))
    fn = np.stack([state[FUNCTION_KEY.format(i)] for i in range(T.FUNCTION_DEPTH)])
    _set(params, ("encoder", "function_embed"), fn)
    return params


def esm3_params_to_torch(params: dict, cfg: ModelConfig) -> dict[str, Array]:
    """The inverse of torch_to_esm3_params: a state dict the reference `ESM3` loads strictly."""
    rows, stacked = esm3_rows(cfg)
    out: dict[str, Array] = {}
    for key, path, layout in rows:
        out[key] = np.ascontiguousarray(layout.to_torch(np.asarray(_get(params, path))))
    for j, layer in enumerate(stacked):
        for key, path, layout in layer:
            out[key] = np.ascontiguousarray(layout.to_torch(np.asarray(_get(params, path))[j]))
    fn = np.asarray(_get(params, ("encoder", "function_embed")))
    for i in range(T.FUNCTION_DEPTH):
        out[FUNCTION_KEY.format(i)] = np.ascontiguousarray(fn[i])
    return out


def infer_esm3_config(state: dict[str, Array], n_heads: int, **overrides: Any) -> ModelConfig:
    """Model shape from the tensors of an ESM3 state dict; the head count cannot be inferred."""
    if "encoder.sequence_embed.weight" not in state:
        raise ValueError("not an ESM3 state dict: no 'encoder.sequence_embed.weight'")
    d = int(state["encoder.sequence_embed.weight"].shape[1])
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.blocks\.(\d+)\.", k))}
    geom = sorted(int(m.group(1)) for k in state if (m := re.match(r"transformer\.blocks\.(\d+)\.geom_attn\.s_norm", k)))
    if geom != list(range(len(geom))):
        raise ValueError(f"geometric attention must sit in the first blocks; found it in blocks {geom}")
    v_heads = int(state[f"transformer.blocks.0.geom_attn.distance_scale_per_head"].shape[0]) if geom else 1
    hid = int(state["transformer.blocks.0.ffn.3.weight"].shape[1])
    raw = dict(d_model=d, n_heads=n_heads, n_layers=len(blocks), v_heads=v_heads, n_layers_geom=len(geom))
    raw.update(overrides)
    cfg = model_config_from_dict(raw, "converted state dict")
    if cfg.ffn_hidden != hid:
        raise ValueError(f"FFN hidden size {hid} does not follow the 8/3 rule for d_model={d} ({cfg.ffn_hidden})")
    return cfg


# --- files ------------------------------------------------------------------------------------


def read_torch_state_dict(path: str | Path) -> dict[str, Array]:
    try:
        import torch
    except ImportError as e:  # torch is only needed at the conversion boundary
        raise ValueError("reading a PyTorch state dict needs torch: pip install 'torch==2.13.0'") from e
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable PyTorch state dict ({e})") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(state).__name__}")
    return {k: v.detach().float().numpy() for k, v in state.items()}


def write_torch_state_dict(state: dict[str, Array], path: str | Path) -> None:
    try:
        import torch
    except ImportError as e:
        raise ValueError("writing a PyTorch state dict needs torch: pip install 'torch==2.13.0'") from e
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)


# Converters for other model kinds register here: kind -> (import fn, export fn).
# import fn: (state dict, args) -> (params, config dict); export fn: (params, config dict) -> state dict.
def _esm3_import(state: dict[str, Array], args: argparse.Namespace) -> tuple[dict, dict]:
    if args.n_heads is None:
        raise ValueError("--n-heads is required for --kind esm3 (24 for esm3-sm-open-v1)")
    cfg = infer_esm3_config(state, args.n_heads)
    return torch_to_esm3_params(state, cfg), to_dict(cfg)


def _esm3_export(params: dict, config: dict) -> dict[str, Array]:
    return esm3_params_to_torch(params, model_config_from_dict(config))


KINDS: dict[str, tuple[Callable, Callable]] = {"esm3": (_esm3_import, _esm3_export)}


def _structure_tokenizer_fn(name: str) -> Callable:
    """A converter of esm3_jax.structure_tokenizer, imported on use (that module imports this one)."""

    def call(*args):
        from esm3_jax import structure_tokenizer

        return getattr(structure_tokenizer, name)(*args)

    return call


KINDS["structure-encoder"] = (_structure_tokenizer_fn("encoder_import"), _structure_tokenizer_fn("encoder_export"))
KINDS["structure-decoder"] = (_structure_tokenizer_fn("decoder_import"), _structure_tokenizer_fn("decoder_export"))


def convert_torch_to_checkpoint(torch_path: str | Path, out_dir: str | Path, kind: str, args: argparse.Namespace) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown --kind '{kind}'; choose from {sorted(KINDS)}")
    state = read_torch_state_dict(torch_path)
    try:
        params, config = KINDS[kind][0](state, args)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{torch_path}: {e}") from e
    return save_params(out_dir, params, config, kind)


def export_checkpoint_to_torch(checkpoint: str | Path, out_path: str | Path) -> None:
    kind, config, params = load_params(checkpoint)
    if kind not in KINDS:
        raise ValueError(f"{checkpoint}: cannot export kind '{kind}'")
    write_torch_state_dict(KINDS[kind][1](params, config), out_path)


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch-state-dict", help="PyTorch .pth to import (official release format)")
    p.add_argument("--kind", default="esm3", help="model kind: " + ", ".join(sorted(KINDS)) + " (default esm3)")
    p.add_argument("--n-heads", type=int, help="attention heads (not inferable from shapes; 24 for esm3-sm-open-v1)")
    p.add_argument("--out", required=True, help="output checkpoint directory (import) or .pth path (--export)")
    p.add_argument("--export", metavar="CHECKPOINT_DIR", help="export this esm3-jax checkpoint to a PyTorch state dict")


def cli_main(args: argparse.Namespace) -> int:
    if args.export:
        export_checkpoint_to_torch(args.export, args.out)
        print(f"wrote PyTorch state dict {args.out}")
        return 0
    if not args.torch_state_dict:
        raise ValueError("give --torch-state-dict PATH to import, or --export CHECKPOINT_DIR to export")
    out = convert_torch_to_checkpoint(args.torch_state_dict, args.out, args.kind, args)
    print(f"wrote {args.kind} checkpoint {out}")
    return 0
