"""The ESM3 weight table: official PyTorch state dict keys <-> esm3-jax parameter paths, and the
model shape inferred from the tensors (only the head count needs to be given)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from esm3_jax import tokens as T
from esm3_jax.compat.layouts import LINEAR, SAME, Array, Row, get_path, kernel, kernel_in, reshaped, set_path
from esm3_jax.model.config import ModelConfig, model_config_from_dict


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
        set_path(params, path, layout.to_flax(state[key]))
    if stacked:
        for i, (key, path, layout) in enumerate(stacked[0]):
            layers = [layout.to_flax(state[layer[i][0]]) for layer in stacked]
            set_path(params, path, np.stack(layers))
    fn = np.stack([state[FUNCTION_KEY.format(i)] for i in range(T.FUNCTION_DEPTH)])
    set_path(params, ("encoder", "function_embed"), fn)
    return params


def esm3_params_to_torch(params: dict, cfg: ModelConfig) -> dict[str, Array]:
    """The inverse of torch_to_esm3_params: a state dict the reference `ESM3` loads strictly."""
    rows, stacked = esm3_rows(cfg)
    out: dict[str, Array] = {}
    for key, path, layout in rows:
        out[key] = np.ascontiguousarray(layout.to_torch(np.asarray(get_path(params, path))))
    for j, layer in enumerate(stacked):
        for key, path, layout in layer:
            out[key] = np.ascontiguousarray(layout.to_torch(np.asarray(get_path(params, path))[j]))
    fn = np.asarray(get_path(params, ("encoder", "function_embed")))
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
    v_heads = int(state["transformer.blocks.0.geom_attn.distance_scale_per_head"].shape[0]) if geom else 1
    hid = int(state["transformer.blocks.0.ffn.3.weight"].shape[1])
    raw = dict(d_model=d, n_heads=n_heads, n_layers=len(blocks), v_heads=v_heads, n_layers_geom=len(geom))
    raw.update(overrides)
    cfg = model_config_from_dict(raw, "converted state dict")
    if cfg.ffn_hidden != hid:
        raise ValueError(f"FFN hidden size {hid} does not follow the 8/3 rule for d_model={d} ({cfg.ffn_hidden})")
    return cfg
