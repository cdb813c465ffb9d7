"""The structure tokenizer's weight tables: the official VQ-VAE encoder and decoder state dicts
(`esm3_structure_encoder_v0.pth`, `esm3_structure_decoder_v0.pth`) <-> esm3-jax variables, and the
`convert --kind structure-encoder|structure-decoder` converters.

Checkpoint kinds (params_io): "structure-encoder" stores {"params", "codebook"} (the codebook is
EMA state, not parameters), "structure-decoder" stores {"params"}.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from esm3_jax.compat.esm3_weights import block_rows
from esm3_jax.compat.layouts import (LINEAR, SAME, Array, Row, kernel, kernel_in, reshaped, state_to_variables,
                                     variables_to_state)
from esm3_jax.config import from_dict, to_dict
from esm3_jax.model.vqvae import DecoderConfig, EncoderConfig


def encoder_rows(cfg: EncoderConfig) -> list[Row]:
    d, vh, hid = cfg.d_model, cfg.v_heads, cfg.ffn_hidden
    rows: list[Row] = [
        ("relative_positional_embedding.embedding.weight", ("params", "relpos_embed"), SAME),
        ("pre_vq_proj.weight", ("params", "pre_vq_proj"), LINEAR),
        ("pre_vq_proj.bias", ("params", "pre_vq_proj_bias"), SAME),
        ("codebook.embeddings", ("codebook", "codebook", "embeddings"), SAME),
        ("codebook.N", ("codebook", "codebook", "cluster_size"), SAME),
        ("codebook.z_avg", ("codebook", "codebook", "embed_sum"), SAME),
    ]
    for i in range(cfg.n_layers):
        t, f = f"transformer.blocks.{i}", ("params", f"block_{i}")
        g, n = f + ("geom_attn",), f + ("ffn",)
        rows += [
            (f"{t}.geom_attn.s_norm.weight", g + ("norm", "scale"), SAME),
            (f"{t}.geom_attn.s_norm.bias", g + ("norm", "bias"), SAME),
            (f"{t}.geom_attn.proj.weight", g + ("proj",), kernel(d, (5, vh, 3))),
            (f"{t}.geom_attn.proj.bias", g + ("proj_bias",), reshaped((5, vh, 3))),
            (f"{t}.geom_attn.out_proj.weight", g + ("out",), kernel_in((vh, 3), d)),
            (f"{t}.geom_attn.out_proj.bias", g + ("out_bias",), SAME),
            (f"{t}.geom_attn.distance_scale_per_head", g + ("distance_scale",), SAME),
            (f"{t}.geom_attn.rotation_scale_per_head", g + ("rotation_scale",), SAME),
            (f"{t}.ffn.0.weight", n + ("norm", "scale"), SAME),
            (f"{t}.ffn.0.bias", n + ("norm", "bias"), SAME),
            (f"{t}.ffn.1.weight", n + ("up",), kernel(d, (2, hid))),
            (f"{t}.ffn.1.bias", n + ("up_bias",), reshaped((2, hid))),
            (f"{t}.ffn.3.weight", n + ("down",), LINEAR),
            (f"{t}.ffn.3.bias", n + ("down_bias",), SAME),
        ]
    return rows


def _head_rows(t: str, f: tuple[str, ...], names=("dense", "norm", "output")) -> list[Row]:
    dense, norm, out = names
    return [
        (f"{t}.{dense}.weight", f + ("dense",), LINEAR),
        (f"{t}.{dense}.bias", f + ("dense_bias",), SAME),
        (f"{t}.{norm}.weight", f + ("norm", "scale"), SAME),
        (f"{t}.{norm}.bias", f + ("norm", "bias"), SAME),
        (f"{t}.{out}.weight", f + ("out",), LINEAR),
        (f"{t}.{out}.bias", f + ("out_bias",), SAME),
    ]


def decoder_rows(cfg: DecoderConfig) -> tuple[list[Row], list[list[Row]]]:
    """(rows for unstacked tensors, per-layer rows of the scanned trunk (empty if unscanned))."""
    p = ("params",)
    rows: list[Row] = [
        ("embed.weight", p + ("token_embed",), SAME),
        ("decoder_stack.norm.weight", p + ("final_norm", "scale"), SAME),
        ("pairwise_classification_head.downproject.weight", p + ("pairwise_head", "down"), LINEAR),
        ("pairwise_classification_head.linear1.weight", p + ("pairwise_head", "pair_in"), LINEAR),
        ("pairwise_classification_head.norm.weight", p + ("pairwise_head", "norm", "scale"), SAME),
        ("pairwise_classification_head.norm.bias", p + ("pairwise_head", "norm", "bias"), SAME),
        ("pairwise_classification_head.linear2.weight", p + ("pairwise_head", "pair_out"), LINEAR),
    ]
    rows += _head_rows("affine_output_projection", p + ("frame_head", "mlp"), ("ffn1", "norm", "proj"))
    rows += _head_rows("plddt_head", p + ("plddt_head",))
    # Heads of the paper's training recipe that the released decoder does not have.
    if cfg.inverse_folding_head:
        rows += _head_rows("sequence_head", p + ("sequence_head",))
    if cfg.sequence_conditioning:
        rows += [("sequence_embed.weight", p + ("sequence_embed",), SAME)]
    tcfg = cfg.trunk_config()
    stacked: list[list[Row]] = []
    for j in range(cfg.n_layers):
        t = f"decoder_stack.blocks.{j}"
        if cfg.scan_layers:
            stacked.append(block_rows(t, p + ("trunk", "blocks", "block"), tcfg, False))
        else:
            rows += block_rows(t, p + ("trunk", f"block_{j}"), tcfg, False)
    return rows, stacked


def infer_encoder_config(state: dict[str, Array], **overrides: Any) -> EncoderConfig:
    """Encoder shape from its tensors (every size is visible in some shape)."""
    key = "relative_positional_embedding.embedding.weight"
    if key not in state:
        raise ValueError(f"not a structure-encoder state dict: no '{key}'")
    rel_rows, d = state[key].shape
    n_layers = len({int(m.group(1)) for k in state if (m := re.match(r"transformer\.blocks\.(\d+)\.", k))})
    n_codes, d_out = state["codebook.embeddings"].shape
    hidden = state["transformer.blocks.0.ffn.3.weight"].shape[1]
    raw = dict(
        d_model=int(d), n_layers=n_layers, d_out=int(d_out), n_codes=int(n_codes), relpos_bins=(int(rel_rows) - 2) // 2,
        v_heads=int(state["transformer.blocks.0.geom_attn.distance_scale_per_head"].shape[0]),
        ffn_expansion=float(hidden) / float(d),
    )
    raw.update(overrides)
    cfg = from_dict(EncoderConfig, raw, "converted encoder")
    if cfg.ffn_hidden != hidden:
        raise ValueError(f"FFN hidden size {hidden} is not a multiple of 256 for d_model={d}")
    cfg.validate()
    return cfg


def infer_decoder_config(state: dict[str, Array], n_heads: int, **overrides: Any) -> DecoderConfig:
    """Decoder shape from its tensors; the head count is not visible in any shape."""
    if "embed.weight" not in state:
        raise ValueError("not a structure-decoder state dict: no 'embed.weight'")
    d = int(state["embed.weight"].shape[1])
    n_layers = len({int(m.group(1)) for k in state if (m := re.match(r"decoder_stack\.blocks\.(\d+)\.", k))})
    raw = dict(
        d_model=d, n_heads=n_heads, n_layers=n_layers,
        inverse_folding_head="sequence_head.dense.weight" in state,
        sequence_conditioning="sequence_embed.weight" in state,
    )
    raw.update(overrides)
    cfg = from_dict(DecoderConfig, raw, "converted decoder")
    cfg.validate()
    return cfg


def encoder_from_torch(state: dict[str, Array], **overrides: Any) -> tuple[EncoderConfig, dict]:
    cfg = infer_encoder_config(state, **overrides)
    return cfg, state_to_variables(state, encoder_rows(cfg), [], f"a structure encoder of {cfg}")


def decoder_from_torch(state: dict[str, Array], n_heads: int, **overrides: Any) -> tuple[DecoderConfig, dict]:
    cfg = infer_decoder_config(state, n_heads, **overrides)
    rows, stacked = decoder_rows(cfg)
    return cfg, state_to_variables(state, rows, stacked, f"a structure decoder of {cfg}")


# `esm3-jax convert --kind structure-encoder|structure-decoder` (registered in convert.KINDS).
def encoder_import(state: dict[str, Array], args: argparse.Namespace) -> tuple[dict, dict]:
    cfg, variables = encoder_from_torch(state)
    return variables, to_dict(cfg)


def encoder_export(variables: dict, config: dict) -> dict[str, Array]:
    return variables_to_state(variables, encoder_rows(from_dict(EncoderConfig, config, "encoder")), [])


def decoder_import(state: dict[str, Array], args: argparse.Namespace) -> tuple[dict, dict]:
    if getattr(args, "n_heads", None) is None:
        raise ValueError("--n-heads is required for --kind structure-decoder (20 for esm3_structure_decoder_v0)")
    cfg, variables = decoder_from_torch(state, args.n_heads)
    return variables, to_dict(cfg)


def decoder_export(variables: dict, config: dict) -> dict[str, Array]:
    rows, stacked = decoder_rows(from_dict(DecoderConfig, config, "decoder"))
    return variables_to_state(variables, rows, stacked)
