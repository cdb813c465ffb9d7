"""The stage-1 VQ-VAE (encoder, codebook and a decoder reading each code through code_proj) and
the framing of codes as decoder tokens; also ESM3's structure tokens from sequence for stage 2."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from esm3_jax import tokens as T
from esm3_jax.model.vqvae import AMINO_ACIDS, N_AMINO_ACIDS, DecoderConfig, EncoderConfig, StructureDecoder, StructureEncoder


def frame_tokens(tokens_BxL, has_token_BxL, valid_BxL):
    """Unframed per-residue codes -> decoder input (B, L+2): BOS, codes (MASK where a residue has
    no structure), EOS right after each chain's last residue, PAD after that."""
    B, L = tokens_BxL.shape
    body = jnp.where(valid_BxL, jnp.where(has_token_BxL, tokens_BxL, T.STRUCTURE_MASK), T.STRUCTURE_PAD)
    framed = jnp.concatenate([jnp.full((B, 1), T.STRUCTURE_BOS), body, jnp.full((B, 1), T.STRUCTURE_PAD)], axis=1)
    n_B = jnp.sum(valid_BxL, axis=1)
    return framed.at[jnp.arange(B), n_B + 1].set(T.STRUCTURE_EOS).astype(jnp.int32)


def _frame_rows(x_BxLx, fill):
    pad = jnp.full((x_BxLx.shape[0], 1, *x_BxLx.shape[2:]), fill, x_BxLx.dtype)
    return jnp.concatenate([pad, x_BxLx, pad], axis=1)


class VQVAE(nn.Module):
    """Encoder + codebook + decoder for stage-1 training. The decoder sees each code through
    `code_proj(z_q)`, z_q being the codebook's straight-through output, so the reconstruction
    losses reach the encoder; at export `code_proj(codebook)` is written into the decoder's token
    table (fold_code_embeddings), after which the decoder is exactly the released architecture,
    reading tokens only."""

    encoder_config: EncoderConfig
    decoder_config: DecoderConfig

    def setup(self):
        self.encoder = StructureEncoder(self.encoder_config)
        self.decoder = StructureDecoder(self.decoder_config)
        self.code_proj = self.param(
            "code_proj", nn.initializers.normal(1.0 / math.sqrt(self.encoder_config.d_out)),
            (self.encoder_config.d_out, self.decoder_config.d_model),
        )

    def __call__(self, coords, residue_index, aa, valid, update_codebook: bool = False, quantize: bool = True):
        """quantize=False is the warm-up: the decoder reads the continuous z (no codebook loss, no
        EMA step), so the encoder learns informative outputs before the codebook is fitted to them."""
        enc = self.encoder.encode(coords, residue_index, None, valid, update_codebook and quantize)
        framed = frame_tokens(enc["tokens"], enc["mask"], valid)
        z = enc["z_q"] if quantize else enc["z"]
        if not quantize:
            enc["commitment"] = jnp.zeros(())
        code_emb = _frame_rows(z @ self.code_proj, 0.0)
        dec = self.decoder(framed, sequence_BxL=_frame_rows(aa, N_AMINO_ACIDS), code_embeddings_BxLxD=code_emb)
        out = {k: _strip(k, v) for k, v in dec.items()}
        out.update(tokens=enc["tokens"], has_token=enc["mask"], commitment=enc["commitment"], **enc["metrics"])
        return out


def _strip(key: str, v):
    """Decoder output over framed positions -> over residues (drop BOS and the last slot)."""
    if key == "ptm":
        return v
    if key in ("pae", "distogram_logits", "direction_logits", "pae_logits"):
        return v[:, 1:-1, 1:-1]
    return v[:, 1:-1]


def fold_code_embeddings(params: dict, codebook: dict) -> dict:
    """Decoder params whose token table rows for codes are code_proj(codebook): the decoder then
    reads tokens exactly as it read z_q in training."""
    dec = jax.tree.map(lambda x: x, params["decoder"])
    codes = jnp.asarray(codebook["encoder"]["codebook"]["embeddings"])
    table = jnp.asarray(dec["token_embed"])
    dec["token_embed"] = table.at[: codes.shape[0]].set(codes @ params["code_proj"])
    return dec


# ESM3 sequence-track ids of AMINO_ACIDS, then X for unknown residues (index 20).
_ESM3_SEQUENCE_IDS = np.array([T.SEQUENCE_VOCAB.index(a) for a in AMINO_ACIDS + "X"], np.int32)


def esm3_structure_tokens(model: nn.Module, params, tokens_BxL, aa_BxL, n_codes: int) -> jnp.ndarray:
    """The structure tokens ESM3 predicts from the sequence alone: (B, L) codes in [0, n_codes).

    tokens_BxL are framed decoder inputs (BOS, ..., EOS, PAD), whose framing the sequence track
    copies; aa_BxL are AMINO_ACIDS indices at the same positions. The structure track is all
    MASK and no coordinates are given; each position takes the argmax of the structure logits
    over the codebook's codes (a small codebook uses only the first n_codes of ESM3's 4096).
    Padding is a sequence of its own, so a chain's prediction is independent of its batch.
    """
    seq = jnp.asarray(_ESM3_SEQUENCE_IDS)[aa_BxL]
    for struct_id, seq_id in ((T.STRUCTURE_BOS, T.SEQUENCE_BOS), (T.STRUCTURE_EOS, T.SEQUENCE_EOS),
                              (T.STRUCTURE_PAD, T.SEQUENCE_PAD)):
        seq = jnp.where(tokens_BxL == struct_id, seq_id, seq)
    sequence_id = (tokens_BxL == T.STRUCTURE_PAD).astype(jnp.int32)
    out = model.apply({"params": params}, sequence_tokens=seq, sequence_id=sequence_id)
    return jax.lax.stop_gradient(jnp.argmax(out["structure_logits"][..., :n_codes], axis=-1).astype(jnp.int32))
