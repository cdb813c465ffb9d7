"""Shape and numerics of the ESM3 transformer (ESM3_SPEC sections 2-4)."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from esm3_jax.config import from_dict, validated


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    v_heads: int = 8  # geometric-attention heads
    n_layers_geom: int = 1  # blocks (from the first) that carry the geometric sublayer
    ffn_expansion: float = 8 / 3  # SwiGLU hidden = ceil(ratio * d / 256) * 256
    scale_residue: bool = True  # divide every branch by sqrt(n_layers / 36)
    # "auto": bfloat16 on GPU/TPU, float32 on the CPU. Geometry and softmax stay fp32 regardless.
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    param_dtype: Literal["float32"] = "float32"
    scan_layers: bool = True  # nn.scan over the plain blocks: compile time independent of depth
    remat: Literal["none", "minimal", "full"] = "none"
    # xla: plain XLA (any backend); cudnn: cuDNN flash attention (GPUs); splash: the Pallas splash
    # kernel (TPUs; lengths a multiple of 128); splash-interpret: that kernel through the Pallas
    # interpreter, on any backend (slow: for testing the TPU path on a CPU).
    attention: Literal["xla", "cudnn", "splash", "splash-interpret"] = "xla"
    # Bytes of one (rows, L, L) fp32 block of the geometric-attention kernel; 0: the kernel's
    # default for the platform compiled for (small, cache-sized blocks on the CPU).
    geom_chunk_bytes: int = 0

    @property
    def dtype(self):
        """The resolved compute dtype."""
        import jax
        import jax.numpy as jnp

        if self.compute_dtype == "auto":
            return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
        return jnp.dtype(self.compute_dtype)

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        # Same integer arithmetic as the reference's swiglu_correction_fn.
        return int(((self.ffn_expansion * self.d_model) + 255) // 256 * 256)

    @property
    def residual_scale(self) -> float:
        return math.sqrt(self.n_layers / 36) if self.scale_residue else 1.0

    def validate(self) -> None:
        for name in ("d_model", "n_heads", "n_layers", "v_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}"
            )
        if self.d_head % 2:
            raise ValueError(f"head size d_model/n_heads={self.d_head} must be even for RoPE")
        if self.d_model % 8:
            raise ValueError(
                f"model.d_model={self.d_model} must be divisible by 8 (8 function-token embeddings are concatenated)"
            )
        if not 0 <= self.n_layers_geom <= self.n_layers:
            raise ValueError(
                f"model.n_layers_geom={self.n_layers_geom} must be in [0, n_layers={self.n_layers}]"
            )
        if self.geom_chunk_bytes < 0:
            raise ValueError(f"model.geom_chunk_bytes must be >= 0 (0: platform default), got {self.geom_chunk_bytes}")
        if self.ffn_expansion <= 0:
            raise ValueError(f"model.ffn_expansion must be positive, got {self.ffn_expansion}")

    def param_count(self) -> int:
        """Analytic parameter count; equals the reference module's for the same shape."""
        d, h, vh = self.d_model, self.ffn_hidden, self.v_heads
        embed = (64 + 4101 + 11 + 19 + 1478) * d + 8 * 260 * (d // 8) + 2 * (16 * d + d)
        block = 2 * d + 3 * d * d + 2 * d + d * d + 2 * d + 2 * d * h + h * d
        geom = d + d * 15 * vh + 3 * vh * d + 2 * vh
        head = lambda out: d * d + d + 2 * d + d * out + out
        heads = sum(head(o) for o in (64, 4096, 11, 19, 2080, 1478))
        return embed + self.n_layers * block + self.n_layers_geom * geom + d + heads


def model_config_from_dict(raw: dict, where: str = "model") -> ModelConfig:
    """A validated ModelConfig from a plain dict (a checkpoint's saved config, say)."""
    return validated(from_dict(ModelConfig, raw, where), where)
