"""Transformer building blocks shared by ESM3 and the VQ-VAE decoder (ESM3_SPEC section 2.1).

Every parameter is created through `param` with logical axis names; the mapping to a device mesh
lives in train/sharding.py only. Matmuls run in the configured compute dtype, with fp32 parameters,
fp32 LayerNorm statistics and fp32 softmax.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = jnp.dtype
Initializer = Callable[..., jnp.ndarray]

# Logical names of activation axes.
BATCH, LENGTH, EMBED = "batch", "length", "embed"


def fan_in_init(fan_in_axes: int = 1) -> Initializer:
    """Truncated normal with variance 1/fan_in over the first `fan_in_axes` kernel axes."""
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(fan_in_axes)), out_axis=-1
    )


def param(
    module: nn.Module,
    name: str,
    shape: Sequence[int],
    axes: Sequence[str | None],
    init: Initializer,
    dtype: Dtype = jnp.float32,
) -> jnp.ndarray:
    """Create a parameter whose every axis carries a logical name (None = never sharded)."""
    assert len(shape) == len(axes), (name, shape, axes)
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def constrain(x: jnp.ndarray, axes: Sequence[str | None]) -> jnp.ndarray:
    """Activation sharding hint by logical names; a no-op unless logical-axis rules are active."""
    return nn.with_logical_constraint(x, tuple(axes))


def dense(x: jnp.ndarray, w: jnp.ndarray, n_in: int = 1) -> jnp.ndarray:
    """x (..., *in) @ w (*in, *out) as one 2-D matmul over all leading (token) axes.

    Written as an einsum over (batch, length, ...), the weight gradient contracts two token axes,
    which XLA:CPU hands to a slower dot than the single flattened axis (seen: the train step's
    weight-gradient matmuls at ~60% of the rate of the others).
    """
    in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
    lead = x.shape[: x.ndim - n_in]
    y = x.reshape(-1, math.prod(in_shape)) @ w.reshape(math.prod(in_shape), math.prod(out_shape))
    return y.reshape(*lead, *out_shape)


# Low-rank adapters (LoRA, Hu et al. 2021) for fine-tuning. They live in the model, beside the
# kernels they adapt, rather than as a reparameterisation of the parameter tree in train/ (which
# would merge W + scale * A @ B for every kernel of the model before each forward): the forward
# adds scale * (x @ A) @ B, a rank-r detour, so no merged copy of a kernel is ever made, and the
# adapters are ordinary parameters of the block that nn.scan stacks and nn.remat recomputes like
# the rest, with logical axis names for sharding. The model only knows their shapes; which parameters train is the optimizer's business
# (train/optim.py), so the model still imports nothing from training.
LORA_TARGETS = ("attn/qkv", "attn/out", "ffn/up", "ffn/down")
LORA_A, LORA_B = "_lora_a", "_lora_b"  # parameter-name suffixes: qkv_lora_a, qkv_lora_b, ...


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Adapters W + (alpha / rank) A @ B on the `targets` kernels of every transformer block:
    A (*in, rank) random (variance 1/fan_in), B (rank, *out) zero, so a fresh adapter changes
    nothing and step 0 computes exactly the base model."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = LORA_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_adapter(module: nn.Module, lora: LoraSpec | None, target: str, name: str,
                 in_shape: Sequence[int], in_axes: Sequence[str | None],
                 out_shape: Sequence[int], out_axes: Sequence[str | None]):
    """(A, B) of the adapter on kernel `name` (shape in_shape + out_shape), or None when `lora`
    does not adapt `target`. The rank axis is never sharded; the others carry the kernel's names."""
    if lora is None or target not in lora.targets:
        return None
    r = lora.rank
    a = param(module, name + LORA_A, (*in_shape, r), (*in_axes, None), fan_in_init(len(in_shape)))
    b = param(module, name + LORA_B, (r, *out_shape), (None, *out_axes), nn.initializers.zeros)
    return a, b


def lora_down(x: jnp.ndarray, adapter, dtype, n_in: int = 1) -> jnp.ndarray | None:
    """x @ A: the (..., rank) input of the adapter's up-projection(s)."""
    return None if adapter is None else dense(x.astype(dtype), adapter[0].astype(dtype), n_in)


def lora_up(y: jnp.ndarray, u: jnp.ndarray | None, adapter, lora: LoraSpec | None, dtype, index=None) -> jnp.ndarray:
    """y + scale * u @ B (B[:, index] when the kernel is used in slices, as qkv and up are)."""
    if u is None:
        return y
    b = adapter[1] if index is None else adapter[1][:, index]
    return y + (dense(u, b.astype(dtype)) * jnp.asarray(lora.scale, dtype)).astype(y.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the trailing `n_feature_axes` axes (eps 1e-5, as torch), fp32 statistics."""

    axes: tuple[str | None, ...] = (EMBED,)
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        n = len(self.axes)
        feature_shape = x.shape[-n:]
        # Statistics over one flattened feature axis: XLA:CPU's reductions over several trailing
        # axes (QK-LayerNorm's heads x head_dim) were ~4x slower than over one.
        x32 = x.astype(jnp.float32).reshape(*x.shape[: x.ndim - n], -1)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * param(self, "scale", feature_shape, self.axes, nn.initializers.ones).reshape(-1)
        if self.use_bias:
            y = y + param(self, "bias", feature_shape, self.axes, nn.initializers.zeros).reshape(-1)
        return y.reshape(x.shape).astype(self.dtype)


def rotary_cos_sin(length: int, d_head: int, base: float = 10000.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """GPT-NeoX rotary tables (L, d_head/2) for positions 0..L-1, in fp32.

    Computed with numpy while tracing, so the tables enter the program as constants: computed
    inside it, XLA fuses the cosine into every RoPE loop and evaluates it per (batch, head)
    element, 128x over for the small config (~2% of its CPU train step). Each fp32 step of the
    reference's formula is rounded as torch rounds it (the power evaluated in fp64, then rounded:
    bit-equal to torch's inverse frequencies for head sizes 64 and 128).
    """
    f32, f64 = np.float32, np.float64
    exponent = np.arange(0, d_head, 2, dtype=f32) / f32(d_head)
    inv_freq = f32(1.0) / (f64(base) ** exponent.astype(f64)).astype(f32)
    angles_LxK = (np.arange(length, dtype=f32)[:, None] * inv_freq[None, :]).astype(f64)
    return jnp.asarray(np.cos(angles_LxK).astype(f32)), jnp.asarray(np.sin(angles_LxK).astype(f32))


def apply_rotary(x_BxLxHxK: jnp.ndarray, cos_LxK2: jnp.ndarray, sin_LxK2: jnp.ndarray) -> jnp.ndarray:
    """Rotate-half (non-interleaved) RoPE over the whole head; math in fp32, result in x's dtype."""
    B, L, H, K = x_BxLxHxK.shape
    # [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] on a (.., 2, K/2) view: the swap of halves is a
    # reverse along the size-2 axis, so everything stays one elementwise loop. (Splitting and
    # concatenating cost XLA:CPU a slow concatenate fusion per call, ~30 ms per layer here.)
    x_h = x_BxLxHxK.astype(jnp.float32).reshape(B, L, H, 2, K // 2)
    cos = cos_LxK2[None, :, None, None, :]
    sin_signed = jnp.stack([-sin_LxK2, sin_LxK2], axis=-2)[None, :, None]
    out = x_h * cos + jnp.flip(x_h, axis=-2) * sin_signed
    return out.reshape(B, L, H, K).astype(x_BxLxHxK.dtype)


def dot_product_attention(
    q_BxLxHxK: jnp.ndarray,
    k_BxLxHxK: jnp.ndarray,
    v_BxLxHxK: jnp.ndarray,
    mask_BxLxL: jnp.ndarray | None,
    implementation: str = "xla",
    segment_ids_BxL: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Softmax attention with scale 1/sqrt(K); `mask` True where a query may see a key.

    The splash kernels take the packing as `segment_ids` (a query sees the keys of its own
    segment), the mask it stands for; the other implementations take the mask.
    """
    if implementation in ("splash", "splash-interpret"):
        return _splash_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL, implementation == "splash-interpret")
    if implementation == "cudnn":
        mask = None if mask_BxLxL is None else mask_BxLxL[:, None]
        return jax.nn.dot_product_attention(
            q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask, implementation="cudnn"
        )
    return _xla_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_BxLxL)


# The plain-XLA attention below spells every matmul with its operands in the layouts XLA:CPU's
# batched matmul runs fastest in (measured on the small shape, 8 x 8 heads x 512 x 64, one core):
# the L x L tensor is always the left operand and is never transposed, and each (L, K) operand
# enters heads-first, as (K, L) or (L, K), whichever the product wants. The (B, L, H, K)
# transposes this takes are 1-6 ms each; the attention's fwd+bwd went from 40 to 55 GFLOP/s and
# the small train step from 8.8 to 8.3 s (BENCHMARKS.md). Other backends assign layouts
# themselves, so the spelling costs nothing there.


def _heads_first(x_BxLxHxK: jnp.ndarray, layout: str) -> jnp.ndarray:
    """(B, L, H, K) -> (B, H, K, L) for layout "kl", (B, H, L, K) for "lk"."""
    return jnp.einsum(f"blhk->bh{layout}", x_BxLxHxK)


@jax.custom_vjp
def _xla_attention(q, k, v, mask_BxLxL):
    return _xla_attention_fwd(q, k, v, mask_BxLxL)[0]


def _xla_attention_fwd(q, k, v, mask_BxLxL):
    q_BxHxKxL = _heads_first(q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype), "kl")
    logits_BxHxLxL = jnp.einsum("bhkq,bhks->bhqs", q_BxHxKxL, _heads_first(k, "kl"), preferred_element_type=jnp.float32)
    if mask_BxLxL is not None:
        logits_BxHxLxL = jnp.where(mask_BxLxL[:, None], logits_BxHxLxL, jnp.finfo(jnp.float32).min)
    # The fp32 probabilities are kept for the softmax backward (as autodiff would keep them);
    # only the matmuls see them in the compute dtype.
    probs = jax.nn.softmax(logits_BxHxLxL, axis=-1)
    o_BxHxLxK = jnp.einsum("bhqs,bhsk->bhqk", probs.astype(v.dtype), _heads_first(v, "lk"))
    o = jnp.einsum("bhqk->bqhk", o_BxHxLxK)
    return o, (q, k, v, probs, o)


def _xla_attention_bwd(res, do):
    """The softmax backward with flash attention's identity sum_s p_qs dp_qs = <do_q, o_q>: the
    row sums come from the (B, L, H, K) output instead of a reduction over the (B, H, L, L)
    probabilities, leaving one elementwise pass over the L x L tensors."""
    q, k, v, probs, o = res
    scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    delta_BxHxL = jnp.einsum("bqhk,bqhk->bhq", do.astype(jnp.float32), o.astype(jnp.float32))
    dp = jnp.einsum("bhkq,bhks->bhqs", _heads_first(do, "kl"), _heads_first(v, "kl"), preferred_element_type=jnp.float32)
    ds = (probs * (dp - delta_BxHxL[..., None])).astype(q.dtype)
    dq_BxHxLxK = jnp.einsum("bhqs,bhsk->bhqk", ds, _heads_first(k * scale, "lk"))
    dk_BxHxKxL = jnp.einsum("bhqs,bhqk->bhks", ds, _heads_first(q * scale, "lk"))
    dv_BxHxKxL = jnp.einsum("bhqs,bhqk->bhks", probs.astype(do.dtype), _heads_first(do, "lk"))
    return (
        jnp.einsum("bhqk->bqhk", dq_BxHxLxK),
        jnp.einsum("bhks->bshk", dk_BxHxKxL),
        jnp.einsum("bhks->bshk", dv_BxHxKxL),
        None,
    )


_xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


SPLASH_BLOCKS = (512, 256, 128)


def _splash_attention(q, k, v, segment_ids_BxL, interpret: bool):
    """The Pallas TPU splash-attention kernel, per device under shard_map.

    A Pallas call is opaque to XLA's partitioner, so it runs on each device's shard: batch split
    as the logical rules split it, heads as they split them, every row's full length (the kernel
    reads whole rows). Outside a mesh it runs on the arrays as they are.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    from jax.sharding import PartitionSpec as P

    B, L, H, K = q.shape
    block = next((b for b in SPLASH_BLOCKS if L % b == 0), None)
    if block is None:
        raise ValueError(f"splash attention needs the sequence length to be a multiple of 128, got {L}")
    sizes = sa.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block,
        block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )
    segments = jnp.zeros((B, L), jnp.int32) if segment_ids_BxL is None else segment_ids_BxL.astype(jnp.int32)
    scale = jnp.asarray(1.0 / math.sqrt(K), q.dtype)

    def per_shard(q, k, v, segments):
        kernel = sa.make_splash_mha(
            sa.MultiHeadMask([sa.FullMask((L, L))] * q.shape[2]), head_shards=1, q_seq_shards=1,
            block_sizes=sizes, interpret=interpret,
        )
        heads_first = lambda a: jnp.swapaxes(a, 1, 2)  # (b, L, h, K) -> (b, h, L, K)
        attend = lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(q=s, kv=s))
        o = jax.vmap(attend)(heads_first(q * scale), heads_first(k), heads_first(v), segments)
        return heads_first(o)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return per_shard(q, k, v, segments)
    batch_axes, _, head_axes, _ = nn.logical_to_mesh_axes((BATCH, LENGTH, "heads", "kv"))
    spec = P(batch_axes, None, head_axes, None)
    return jax.shard_map(
        per_shard, in_specs=(spec, spec, spec, P(batch_axes, None)), out_specs=spec, check_vma=False,
    )(q, k, v, segments)


class MultiHeadAttention(nn.Module):
    """Pre-LN self-attention: LN -> QKV (no bias) -> QK-LayerNorm over the full width -> RoPE."""

    d_model: int
    n_heads: int
    dtype: Dtype = jnp.float32
    implementation: str = "xla"
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x_BxLxD, mask_BxLxL, cos, sin, segment_ids_BxL=None):
        H, K = self.n_heads, self.d_model // self.n_heads
        y = LayerNorm(dtype=self.dtype, name="norm")(x_BxLxD)
        w_qkv = param(self, "qkv", (self.d_model, 3, H, K), (EMBED, None, "heads", "kv"), fan_in_init())
        qkv_lora = lora_adapter(self, self.lora, "attn/qkv", "qkv", (self.d_model,), (EMBED,),
                                (3, H, K), (None, "heads", "kv"))
        u_qkv = lora_down(y, qkv_lora, self.dtype)
        # One matmul per projection on slices of the weight, not one wide matmul sliced after:
        # the backward pass of slicing the (B, L, 3, H, K) activation sums three zero-padded
        # copies of it, a full extra pass over the largest tensor of the sublayer.
        q, k, v = (lora_up(dense(y, w_qkv[:, t].astype(self.dtype)), u_qkv, qkv_lora, self.lora, self.dtype, t)
                   for t in range(3))
        # QK-LayerNorm normalises the whole d_model-wide vector, not each head (the reference's choice).
        q = LayerNorm(("heads", "kv"), use_bias=False, dtype=self.dtype, name="q_norm")(q)
        k = LayerNorm(("heads", "kv"), use_bias=False, dtype=self.dtype, name="k_norm")(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = dot_product_attention(q, k, v, mask_BxLxL, self.implementation, segment_ids_BxL)
        w_out = param(self, "out", (H, K, self.d_model), ("heads", "kv", EMBED), fan_in_init(2))
        out_lora = lora_adapter(self, self.lora, "attn/out", "out", (H, K), ("heads", "kv"), (self.d_model,), (EMBED,))
        return lora_up(dense(o, w_out.astype(self.dtype), n_in=2), lora_down(o, out_lora, self.dtype, n_in=2),
                       out_lora, self.lora, self.dtype)


@jax.custom_vjp
def swiglu(gate: jnp.ndarray, up: jnp.ndarray) -> jnp.ndarray:
    """silu(gate) * up, math in fp32, result in the inputs' dtype.

    The backward pass is written out so that it keeps only its two inputs (the matmul outputs,
    which exist anyway) and computes both gradients in one elementwise pass. Left to autodiff,
    XLA:CPU saved the sigmoid and silu(gate) as extra residuals and spent five passes over the
    (tokens, hidden) tensors, forward and backward, where two do.
    """
    return _swiglu_fwd(gate, up)[0]


def _swiglu_fwd(gate, up):
    g = gate.astype(jnp.float32)
    return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(gate.dtype), (gate, up)


def _swiglu_bwd(res, dh):
    gate, up = res
    g, u, dh = gate.astype(jnp.float32), up.astype(jnp.float32), dh.astype(jnp.float32)
    sig = jax.nn.sigmoid(g)
    d_gate = dh * u * sig * (1.0 + g * (1.0 - sig))  # d/dg [g sigmoid(g)]
    return d_gate.astype(gate.dtype), (dh * g * sig).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class SwiGLU(nn.Module):
    """Pre-LN SwiGLU FFN: LN -> up (d -> 2h; the first half is the gate) -> silu(g) * u -> down."""

    d_model: int
    hidden: int
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x_BxLxD):
        y = LayerNorm(dtype=self.dtype, name="norm")(x_BxLxD)
        # Stored as (d, 2, h) so that sharding the hidden axis keeps gate and value together.
        w_up = param(self, "up", (self.d_model, 2, self.hidden), (EMBED, None, "mlp"), fan_in_init())
        up_lora = lora_adapter(self, self.lora, "ffn/up", "up", (self.d_model,), (EMBED,), (2, self.hidden), (None, "mlp"))
        u_up = lora_down(y, up_lora, self.dtype)
        # Gate and value as two matmuls on weight slices (see MultiHeadAttention: slicing one wide
        # activation costs an extra full pass in the backward).
        gate, up = (lora_up(dense(y, w_up[:, t].astype(self.dtype)), u_up, up_lora, self.lora, self.dtype, t)
                    for t in range(2))
        if self.use_bias:
            b_up = param(self, "up_bias", (2, self.hidden), (None, "mlp"), nn.initializers.zeros).astype(self.dtype)
            gate, up = gate + b_up[0], up + b_up[1]
        h = swiglu(gate, up)
        h = constrain(h, (BATCH, LENGTH, "mlp"))
        w_down = param(self, "down", (self.hidden, self.d_model), ("mlp", EMBED), fan_in_init())
        down_lora = lora_adapter(self, self.lora, "ffn/down", "down", (self.hidden,), ("mlp",), (self.d_model,), (EMBED,))
        out = lora_up(dense(h, w_down.astype(self.dtype)), lora_down(h, down_lora, self.dtype), down_lora, self.lora, self.dtype)
        if self.use_bias:
            out = out + param(self, "down_bias", (self.d_model,), (EMBED,), nn.initializers.zeros).astype(self.dtype)
        return out


class RegressionHead(nn.Module):
    """Output head: Dense(d, h) -> GELU (erf) -> LayerNorm -> Dense(h, out), all with biases;
    h = d unless `hidden` says otherwise (the function-token decoder's heads use 4d)."""

    d_model: int
    out_features: int
    out_axis: str | None = "vocab"
    dtype: Dtype = jnp.float32
    hidden: int | None = None

    @nn.compact
    def __call__(self, x_BxLxD):
        h_dim = self.hidden or self.d_model
        w1 = param(self, "dense", (self.d_model, h_dim), (EMBED, "mlp"), fan_in_init())
        b1 = param(self, "dense_bias", (h_dim,), ("mlp",), nn.initializers.zeros)
        h = dense(x_BxLxD, w1.astype(self.dtype)) + b1.astype(self.dtype)
        h = nn.gelu(h, approximate=False)
        h = LayerNorm(("mlp",), dtype=self.dtype, name="norm")(h)
        w2 = param(self, "out", (h_dim, self.out_features), ("mlp", self.out_axis), fan_in_init())
        b2 = param(self, "out_bias", (self.out_features,), (self.out_axis,), nn.initializers.zeros)
        return dense(h, w2.astype(self.dtype)) + b2.astype(self.dtype)
