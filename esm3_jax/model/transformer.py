"""The bidirectional transformer trunk: pre-LN blocks (attention, optional geometric attention,
SwiGLU, depth-scaled residuals), geometric blocks first, the plain ones scanned or unrolled.
ESM3 and the VQ-VAE decoder share it."""

from __future__ import annotations

import flax.linen as nn
import jax

from esm3_jax.model.config import ModelConfig
from esm3_jax.model.geom_attention import GeometricAttention
from esm3_jax.model.layers import BATCH, EMBED, LENGTH, LoraSpec, MultiHeadAttention, SwiGLU, constrain, rotary_cos_sin

REMAT_POLICIES = {
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class Block(nn.Module):
    """Pre-LN block: x += MHA(x)/s; [x += GeomMHA(x)/s]; x += FFN(x)/s."""

    config: ModelConfig
    use_geom: bool = False
    lora: LoraSpec | None = None  # adapters on the attention and FFN kernels (layers.LoraSpec)

    @nn.compact
    def __call__(self, x_BxLxD, mask_BxLxL, cos, sin, segment_ids_BxL=None, geom=None):
        cfg = self.config
        dt = cfg.dtype
        s = cfg.residual_scale
        x_BxLxD = constrain(x_BxLxD, (BATCH, LENGTH, EMBED))
        a = MultiHeadAttention(cfg.d_model, cfg.n_heads, dt, cfg.attention, self.lora, name="attn")(
            x_BxLxD, mask_BxLxL, cos, sin, segment_ids_BxL
        )
        x_BxLxD = x_BxLxD + a.astype(x_BxLxD.dtype) / s
        if self.use_geom:
            g = GeometricAttention(cfg.d_model, cfg.v_heads, mask_and_zero_frameless=True,
                                   chunk_bytes=cfg.geom_chunk_bytes or None, name="geom_attn")(
                x_BxLxD, *geom
            )
            x_BxLxD = x_BxLxD + g.astype(x_BxLxD.dtype) / s
        f = SwiGLU(cfg.d_model, cfg.ffn_hidden, dtype=dt, lora=self.lora, name="ffn")(x_BxLxD)
        return x_BxLxD + f.astype(x_BxLxD.dtype) / s


class _ScanBody(nn.Module):
    """A plain block with the (carry, broadcast args) -> (carry, out) signature nn.scan wants."""

    config: ModelConfig
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x, mask_BxLxL, cos, sin, segment_ids_BxL):
        block = Block
        if self.config.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[self.config.remat], prevent_cse=False)
        return block(self.config, lora=self.lora, name="block")(x, mask_BxLxL, cos, sin, segment_ids_BxL), None


class Trunk(nn.Module):
    """Geometric blocks first (unscanned), then the plain blocks, scanned or unrolled."""

    config: ModelConfig
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x_BxLxD, mask_BxLxL, geom, segment_ids_BxL=None):
        """mask: True where a query may see a key (None: everywhere); segment_ids: the same packing
        as ids per position, for the attention kernels that take it that way (splash)."""
        cfg = self.config
        cos, sin = rotary_cos_sin(x_BxLxD.shape[1], cfg.d_head)
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=())
        for i in range(cfg.n_layers_geom):
            x_BxLxD = block(cfg, use_geom=True, lora=self.lora, name=f"geom_block_{i}")(
                x_BxLxD, mask_BxLxL, cos, sin, segment_ids_BxL, geom
            )
        n_plain = cfg.n_layers - cfg.n_layers_geom
        if n_plain and cfg.scan_layers:
            stack = nn.scan(
                _ScanBody,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=n_plain,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BxLxD, _ = stack(cfg, self.lora, name="blocks")(x_BxLxD, mask_BxLxL, cos, sin, segment_ids_BxL)
        else:
            for i in range(n_plain):
                x_BxLxD = block(cfg, lora=self.lora, name=f"block_{i}")(x_BxLxD, mask_BxLxL, cos, sin, segment_ids_BxL)
        return x_BxLxD
