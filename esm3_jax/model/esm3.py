"""The ESM3 transformer: embed every track, sum, one bidirectional trunk, one head per track.

Numerically equal to the reference `esm.models.esm3.ESM3.forward` (ESM3_SPEC sections 1-4); the
parity tests in tests/test_model_parity.py build both with the same weights and compare.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from esm3_jax import tokens as T
from esm3_jax.batch import TRACK_KEYS
from esm3_jax.model.config import ModelConfig
from esm3_jax.model.frames import backbone_frames
from esm3_jax.model.layers import BATCH, EMBED, LENGTH, LayerNorm, LoraSpec, RegressionHead, constrain, param
from esm3_jax.model.transformer import Trunk

# Output heads: name -> number of logits (the function head's 2080 = 8 x 260 is reshaped).
HEADS = {
    "sequence": T.SEQUENCE_EMBED_ROWS,
    "structure": T.STRUCTURE_CODEBOOK_SIZE,
    "ss8": T.SS8_VOCAB_SIZE,
    "sasa": T.SASA_VOCAB_SIZE,
    "function": T.FUNCTION_DEPTH * T.FUNCTION_VOCAB_SIZE,
    "residue": T.RESIDUE_VOCAB_SIZE,
}
OUTPUT_KEYS = {
    "sequence": "sequence_logits",
    "structure": "structure_logits",
    "ss8": "secondary_structure_logits",
    "sasa": "sasa_logits",
    "function": "function_logits",
    "residue": "residue_logits",
}
def plddt_rbf(values: jnp.ndarray, n_bins: int = T.PLDDT_RBF_BINS) -> jnp.ndarray:
    """16 Gaussian features of a value in [0, 1]: centres linspace(0, 1, 16), width 1/16."""
    centres = jnp.linspace(0.0, 1.0, n_bins, dtype=jnp.float32)
    z = (values.astype(jnp.float32)[..., None] - centres) / (1.0 / n_bins)
    return jnp.exp(-(z**2))


def fill_defaults(inputs: dict[str, Any]) -> dict[str, jnp.ndarray]:
    """The reference forward's defaults for every absent track (ESM3_SPEC 1.8)."""
    present = [inputs[k] for k in TRACK_KEYS if inputs.get(k) is not None]
    if not present:
        raise ValueError("ESM3 needs at least one track: got no sequence, structure, ss8, sasa, function, residue or coordinate input")
    B, L = present[0].shape[:2]
    full = lambda v, shape=(B, L), dt=jnp.int32: jnp.full(shape, v, dt)
    get = lambda k, default: default if inputs.get(k) is None else jnp.asarray(inputs[k])
    out = {
        "sequence_tokens": get("sequence_tokens", full(T.SEQUENCE_MASK)),
        "ss8_tokens": get("ss8_tokens", full(T.SS8_PAD)),
        "sasa_tokens": get("sasa_tokens", full(T.SASA_PAD)),
        "average_plddt": get("average_plddt", full(1.0, dt=jnp.float32)),
        "per_res_plddt": get("per_res_plddt", full(0.0, dt=jnp.float32)),
        "chain_id": get("chain_id", full(0)),
        "sequence_id": None if inputs.get("sequence_id") is None else jnp.asarray(inputs["sequence_id"]),
        "residue_annotation_tokens": get(
            "residue_annotation_tokens", full(T.RESIDUE_PAD, (B, L, T.RESIDUE_MAX_ANNOTATIONS))
        ),
        "function_tokens": get("function_tokens", full(T.FUNCTION_PAD, (B, L, T.FUNCTION_DEPTH))),
        "structure_coords": get("structure_coords", full(jnp.nan, (B, L, 3, 3), jnp.float32)),
        "structure_tokens": get("structure_tokens", full(T.STRUCTURE_MASK)),
    }
    for k, v in out.items():
        if v is not None and v.shape[:2] != (B, L):
            raise ValueError(f"input '{k}' has shape {v.shape}, expected (batch, length) = {(B, L)} first")
    return out


def patch_structure_specials(structure_BxL: jnp.ndarray, sequence_BxL: jnp.ndarray) -> jnp.ndarray:
    """-1 becomes MASK; BOS/PAD/EOS/chain-break positions of the sequence set their structure twins."""
    s = jnp.where(structure_BxL == -1, T.STRUCTURE_MASK, structure_BxL)
    for seq_id, struct_id in (
        (T.SEQUENCE_BOS, T.STRUCTURE_BOS),
        (T.SEQUENCE_PAD, T.STRUCTURE_PAD),
        (T.SEQUENCE_EOS, T.STRUCTURE_EOS),
        (T.SEQUENCE_CHAINBREAK, T.STRUCTURE_CHAINBREAK),
    ):
        s = jnp.where(sequence_BxL == seq_id, struct_id, s)
    return s


class EncodeInputs(nn.Module):
    """Sum of the embeddings of every track (no positional embedding: RoPE carries position)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: dict[str, jnp.ndarray]) -> jnp.ndarray:
        d = self.config.d_model
        emb = nn.initializers.normal(stddev=1.0)

        def table(name, rows, ids):
            w = param(self, name, (rows, d), ("input_vocab", EMBED), emb)
            return jnp.take(w, ids, axis=0)

        h = table("sequence_embed", T.SEQUENCE_EMBED_ROWS, x["sequence_tokens"])
        h += table("structure_embed", T.STRUCTURE_VOCAB_SIZE, x["structure_tokens"])
        h += table("ss8_embed", T.SS8_VOCAB_SIZE, x["ss8_tokens"])
        h += table("sasa_embed", T.SASA_VOCAB_SIZE, x["sasa_tokens"])

        for name, key in (("plddt_proj", "average_plddt"), ("per_res_plddt_proj", "per_res_plddt")):
            w = param(self, name, (T.PLDDT_RBF_BINS, d), (None, EMBED), nn.initializers.lecun_normal())
            b = param(self, name + "_bias", (d,), (EMBED,), nn.initializers.zeros)
            h += plddt_rbf(x[key]) @ w + b

        # 8 function tables of width d/8, concatenated; id 0 (pad/mask) embeds to zero.
        fn_ids = x["function_tokens"]
        w_fn = param(
            self, "function_embed", (T.FUNCTION_DEPTH, T.FUNCTION_VOCAB_SIZE, d // 8), (None, "input_vocab", None), emb
        )
        fn = jax.vmap(lambda w, ids: jnp.take(w, ids, axis=0), in_axes=(0, -1), out_axes=-2)(w_fn, fn_ids)
        fn = fn * (fn_ids != T.FUNCTION_PAD)[..., None]
        h += fn.reshape(*fn.shape[:-2], d)

        # Residue annotations: a sum over up to 16 ids per position; id 0 contributes nothing.
        ra_ids = x["residue_annotation_tokens"]
        w_ra = param(self, "residue_embed", (T.RESIDUE_VOCAB_SIZE, d), ("input_vocab", EMBED), emb)
        # As a (B, L, 1478) count matrix built by scatter-add, then one matmul: ~4x cheaper on
        # the CPU than summing one-hots or gathered rows, and a plain matmul for the backward.
        B, L, K = ra_ids.shape
        counts = jnp.zeros((B, L, T.RESIDUE_VOCAB_SIZE), jnp.float32)
        counts = counts.at[jnp.arange(B)[:, None, None], jnp.arange(L)[None, :, None], ra_ids].add(1.0)
        counts = counts.at[..., T.RESIDUE_PAD].set(0.0)
        h += counts @ w_ra
        return h


class ESM3(nn.Module):
    """ESM3. Call with the reference forward's keyword arguments; any may be absent (None).

    `lora`: low-rank adapters on every block's attention and FFN kernels, for fine-tuning; the
    weights' shapes are still `config`'s (a checkpoint's model config is the same either way)."""

    config: ModelConfig
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(
        self,
        sequence_tokens=None,
        structure_tokens=None,
        ss8_tokens=None,
        sasa_tokens=None,
        function_tokens=None,
        residue_annotation_tokens=None,
        average_plddt=None,
        per_res_plddt=None,
        structure_coords=None,
        chain_id=None,
        sequence_id=None,
    ) -> dict[str, jnp.ndarray]:
        cfg = self.config
        x = fill_defaults(
            dict(
                sequence_tokens=sequence_tokens,
                structure_tokens=structure_tokens,
                ss8_tokens=ss8_tokens,
                sasa_tokens=sasa_tokens,
                function_tokens=function_tokens,
                residue_annotation_tokens=residue_annotation_tokens,
                average_plddt=average_plddt,
                per_res_plddt=per_res_plddt,
                structure_coords=structure_coords,
                chain_id=chain_id,
                sequence_id=sequence_id,
            )
        )
        x["structure_tokens"] = patch_structure_specials(x["structure_tokens"], x["sequence_tokens"])
        rot, trans, frame_mask = backbone_frames(x["structure_coords"])

        h_BxLxD = EncodeInputs(cfg, name="encoder")(x)
        h_BxLxD = constrain(h_BxLxD, (BATCH, LENGTH, EMBED))

        seq_id = x["sequence_id"]
        mask_BxLxL = None if seq_id is None else seq_id[:, :, None] == seq_id[:, None, :]
        geom_seq_id = jnp.zeros_like(x["chain_id"]) if seq_id is None else seq_id
        geom = (rot, trans, frame_mask, geom_seq_id, x["chain_id"])
        h_BxLxD = Trunk(cfg, self.lora, name="trunk")(h_BxLxD, mask_BxLxL, geom, seq_id)

        embeddings = h_BxLxD
        normed = LayerNorm(use_bias=False, dtype=cfg.dtype, name="final_norm")(h_BxLxD)
        out = {"embeddings": embeddings.astype(jnp.float32)}
        for name, n_out in HEADS.items():
            logits = RegressionHead(
                cfg.d_model, n_out, dtype=cfg.dtype, name=f"{name}_head"
            )(normed)
            out[OUTPUT_KEYS[name]] = logits.astype(jnp.float32)
        fl = out["function_logits"]
        out["function_logits"] = fl.reshape(*fl.shape[:-1], T.FUNCTION_DEPTH, T.FUNCTION_VOCAB_SIZE)
        return out


def init_params(config: ModelConfig, rng: jax.Array, batch: int = 1, length: int = 8) -> Any:
    """Boxed (logically partitioned) parameters of a fresh model, from a dummy sequence batch."""
    tokens = jnp.full((batch, length), T.SEQUENCE_MASK, jnp.int32)
    config = dataclasses.replace(config, attention="xla")  # same parameters; any length works
    # Jitted: eager, op-by-op initialisation is orders of magnitude slower on the CPU.
    return jax.jit(lambda r: ESM3(config).init(r, sequence_tokens=tokens)["params"])(rng)
