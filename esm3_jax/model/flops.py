"""Analytic model FLOPs (multiply-add = 2 FLOPs), the numerator of model FLOP utilisation.

Counts the matmuls the architecture requires (projections, attention scores and mixing, the
geometric sublayer, the heads); embedding lookups and elementwise work are not model FLOPs.
"""

from __future__ import annotations

from esm3_jax import tokens as T
from esm3_jax.model.config import ModelConfig

HEAD_OUTPUTS = (
    T.SEQUENCE_EMBED_ROWS,
    T.STRUCTURE_CODEBOOK_SIZE,
    T.SS8_VOCAB_SIZE,
    T.SASA_VOCAB_SIZE,
    T.FUNCTION_DEPTH * T.FUNCTION_VOCAB_SIZE,
    T.RESIDUE_VOCAB_SIZE,
)


def forward_flops_per_token(cfg: ModelConfig, length: int) -> float:
    """Forward FLOPs per token at sequence length `length` (full attention over the row)."""
    d, h, vh, L = cfg.d_model, cfg.ffn_hidden, cfg.v_heads, length
    block = 2 * (3 * d * d + d * d + 3 * d * h) + 4 * L * d
    # Geometric sublayer: 15*vh projections in, 3*vh out, and per key: direction (3),
    # distance (3) and value mixing (3) per head.
    geom = 2 * (15 * vh * d + 3 * vh * d) + 2 * 9 * vh * L
    heads = sum(2 * (d * d + d * n) for n in HEAD_OUTPUTS)
    return cfg.n_layers * block + cfg.n_layers_geom * geom + heads


def train_flops_per_token(cfg: ModelConfig, length: int) -> float:
    """Forward + backward (2x forward); rematerialisation is not counted, by convention."""
    return 3 * forward_flops_per_token(cfg, length)
