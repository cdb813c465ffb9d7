"""The function-token decoder: a residue's 8 function tokens -> keyword and InterPro logits.

A small transformer that reads one residue at a time. With `unpack_lsh_bits` (the released
decoder) the 8 tokens are unpacked into their 64 LSH bits, and bit j with value b is token
2j + b, so every bit has its own pair of embeddings; a residue with any special token (pad,
motif, unk, none) reads as token 0 at every slot. Otherwise token t at depth d is id
260 d + t. The sequence of 64 (or 8) embeddings goes through plain pre-LN blocks (attention
with biases and RoPE but no QK-LayerNorm, a GELU FFN of width 4d, residual scale 1), a final
bias-free LayerNorm, a mean over the slots, and three heads (Dense(d, 4d) -> GELU -> LayerNorm
-> Dense): keyword presence logits, keyword TF-IDF regression, InterPro presence logits.
Weights: compat/function_decoder_weights.py; parity with the reference:
tests/test_function_decoder.py.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from esm3_jax import tokens as T
from esm3_jax.model.layers import (EMBED, LayerNorm, RegressionHead, apply_rotary, dense, dot_product_attention,
                                   fan_in_init, param, rotary_cos_sin)

HEADS = ("keyword_logits", "keyword_tfidf", "interpro_logits")


@dataclasses.dataclass(frozen=True)
class FunctionDecoderConfig:
    d_model: int = 1024
    n_heads: int = 8
    n_layers: int = 3
    function_token_depth: int = T.FUNCTION_DEPTH
    function_token_vocab_size: int = T.FUNCTION_VOCAB_SIZE
    num_interpro_classes: int = 29026
    keyword_vocabulary_size: int = 58641
    unpack_lsh_bits: bool = True
    num_special_tokens: int = T.FUNCTION_LSH_OFFSET
    bits_per_token: int = 8

    @property
    def n_inputs(self) -> int:
        """Rows of the embedding table."""
        if self.unpack_lsh_bits:
            return 2 * self.function_token_depth * self.bits_per_token
        return self.function_token_depth * self.function_token_vocab_size

    def validate(self) -> None:
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"function decoder: d_model {self.d_model} must split into {self.n_heads} heads of even size")
        for name in ("n_layers", "num_interpro_classes", "keyword_vocabulary_size", "function_token_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"function decoder: {name} must be >= 1, got {getattr(self, name)}")


class _Attention(nn.Module):
    """Pre-LN self-attention with biases, RoPE, no QK-LayerNorm, no mask (one residue's slots)."""

    d_model: int
    n_heads: int

    @nn.compact
    def __call__(self, x_NxSxD, cos, sin):
        H, K = self.n_heads, self.d_model // self.n_heads
        y = LayerNorm(name="norm")(x_NxSxD)
        w_qkv = param(self, "qkv", (self.d_model, 3, H, K), (EMBED, None, "heads", "kv"), fan_in_init())
        b_qkv = param(self, "qkv_bias", (3, H, K), (None, "heads", "kv"), nn.initializers.zeros)
        q, k, v = (dense(y, w_qkv[:, t]) + b_qkv[t] for t in range(3))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = dot_product_attention(q, k, v, None)
        w_out = param(self, "out", (H, K, self.d_model), ("heads", "kv", EMBED), fan_in_init(2))
        return dense(o, w_out, n_in=2) + param(self, "out_bias", (self.d_model,), (EMBED,), nn.initializers.zeros)


class _GeluFFN(nn.Module):
    d_model: int
    hidden: int

    @nn.compact
    def __call__(self, x_NxSxD):
        y = LayerNorm(name="norm")(x_NxSxD)
        w_up = param(self, "up", (self.d_model, self.hidden), (EMBED, "mlp"), fan_in_init())
        h = dense(y, w_up) + param(self, "up_bias", (self.hidden,), ("mlp",), nn.initializers.zeros)
        h = nn.gelu(h, approximate=False)
        w_down = param(self, "down", (self.hidden, self.d_model), ("mlp", EMBED), fan_in_init())
        return dense(h, w_down) + param(self, "down_bias", (self.d_model,), (EMBED,), nn.initializers.zeros)


class FunctionTokenDecoder(nn.Module):
    """(N, depth) function token ids -> {head: (N, classes)} logits, one residue per row. fp32."""

    config: FunctionDecoderConfig

    def input_ids(self, tokens_NxD: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        tokens_NxD = tokens_NxD.astype(jnp.int32)
        depth = cfg.function_token_depth
        if not cfg.unpack_lsh_bits:
            return tokens_NxD + cfg.function_token_vocab_size * jnp.arange(depth)[None, :]
        lsh = tokens_NxD - cfg.num_special_tokens
        # Slot hob * depth + d holds bit `hob` of depth d's value (the reference's order).
        bits_NxS = jnp.concatenate([((lsh >> hob) & 1) for hob in range(cfg.bits_per_token)], axis=1)
        ids = 2 * jnp.arange(depth * cfg.bits_per_token)[None, :] + bits_NxS
        special_N = jnp.any(tokens_NxD < cfg.num_special_tokens, axis=1)
        return jnp.where(special_N[:, None], 0, ids)

    @nn.compact
    def __call__(self, tokens_NxD: jnp.ndarray) -> dict[str, jnp.ndarray]:
        cfg = self.config
        table = param(self, "embed", (cfg.n_inputs, cfg.d_model), (None, EMBED), nn.initializers.normal(1.0))
        x = jnp.take(table, self.input_ids(tokens_NxD), axis=0)
        cos, sin = rotary_cos_sin(x.shape[1], cfg.d_model // cfg.n_heads)
        for i in range(cfg.n_layers):
            x = x + _Attention(cfg.d_model, cfg.n_heads, name=f"block_{i}_attn")(x, cos, sin)
            x = x + _GeluFFN(cfg.d_model, 4 * cfg.d_model, name=f"block_{i}_ffn")(x)
        pooled_NxD = jnp.mean(LayerNorm(use_bias=False, name="final_norm")(x), axis=1)
        sizes = {"keyword_logits": cfg.keyword_vocabulary_size, "keyword_tfidf": cfg.keyword_vocabulary_size,
                 "interpro_logits": cfg.num_interpro_classes}
        return {name: RegressionHead(cfg.d_model, sizes[name], hidden=4 * cfg.d_model, name=name)(pooled_NxD)
                for name in HEADS}
