"""The structure tokenizer: a VQ-VAE from backbone coordinates to one token per residue and back
(ESM3_SPEC section 5).

Encoder: each residue's 16 nearest neighbours (by CA distance) form a small neighbourhood whose
only initial features are clamped relative sequence positions; two geometric-attention blocks
mix them, and the query residue's final state, projected to 128 dimensions, is quantised by an
EMA codebook. The reference runs all 16 neighbourhood rows through every block although only
row 0 is read; here the last block computes row 0 alone (same result, far less work).

Decoder: a plain transformer over the tokens (BOS/EOS included) with a frame head (backbone
atoms), a pairwise head (distogram, binned directions, pAE -> pTM) and a pLDDT head. With
`sequence_conditioning` it adds amino-acid embeddings (stage 2 of the paper's recipe), with
`all_atom` it also builds every heavy atom from the frames and the frame head's torsion angles
(structure/all_atom.py), and with `inverse_folding_head` it predicts the amino acids (a stage-1
training signal).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from esm3_jax import tokens as T
from esm3_jax.model.codebook import EMACodebook
from esm3_jax.model.config import ModelConfig
from esm3_jax.model.transformer import Trunk
from esm3_jax.model.frames import backbone_frames
from esm3_jax.model.geom_attention import GeometricAttention
from esm3_jax.model.layers import EMBED, LayerNorm, RegressionHead, SwiGLU, fan_in_init, param
from esm3_jax.model.structure_heads import (
    N_PLDDT_BINS,
    PAIRWISE_SPLITS,
    FrameHead,
    PairwiseHead,
    expected_plddt,
    predicted_aligned_error,
    predicted_tm,
)
from esm3_jax.structure.all_atom import atom14_from_frames, atom14_to_atom37
from esm3_jax.structure.rigid_groups import AMINO_ACIDS

# Pairs ranked by sequence separation instead of space (either residue has no coordinates) sit
# behind every real distance: 1e6 + 100 |i - j|, as the reference.
_NO_COORDS_DISTANCE = 1e6
N_AMINO_ACIDS = len(AMINO_ACIDS)  # 20; index 20 = unknown


def aa_indices(sequence: str):
    """Amino-acid letters -> indices into AMINO_ACIDS; anything else -> 20 (unknown)."""
    lookup = {a: i for i, a in enumerate(AMINO_ACIDS)}
    return np.array([lookup.get(a, N_AMINO_ACIDS) for a in sequence], np.int32)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    d_model: int = 1024
    v_heads: int = 128
    n_layers: int = 2
    d_out: int = 128
    n_codes: int = T.STRUCTURE_CODEBOOK_SIZE
    knn: int = 16
    relpos_bins: int = 32  # relative positions are clamped to [-32, 32]
    ffn_expansion: float = 4.0
    ema_decay: float = 0.99
    restart_threshold: float = 1.0
    commitment_weight: float = 0.25

    @property
    def ffn_hidden(self) -> int:
        return int(((self.ffn_expansion * self.d_model) + 255) // 256 * 256)

    def validate(self) -> None:
        for name in ("d_model", "v_heads", "n_layers", "d_out", "n_codes", "knn", "relpos_bins"):
            if getattr(self, name) <= 0:
                raise ValueError(f"encoder.{name} must be positive, got {getattr(self, name)}")
        if self.n_codes > T.STRUCTURE_CODEBOOK_SIZE:
            raise ValueError(f"encoder.n_codes={self.n_codes} exceeds the token vocabulary's {T.STRUCTURE_CODEBOOK_SIZE} codes")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"encoder.ema_decay must be in (0, 1), got {self.ema_decay}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    d_model: int = 1280
    n_heads: int = 20
    n_layers: int = 30
    sequence_conditioning: bool = False  # stage 2: add amino-acid embeddings to the tokens'
    inverse_folding_head: bool = False  # stage 1: predict the amino acids from the tokens
    # Stage 2: also return every heavy atom (atom14 and atom37), built from the frames and the
    # frame head's 7 torsions for the given sequence. Needs sequence_conditioning.
    all_atom: bool = False
    scan_layers: bool = True
    remat: str = "none"

    def trunk_config(self) -> ModelConfig:
        return ModelConfig(
            d_model=self.d_model, n_heads=self.n_heads, n_layers=self.n_layers, n_layers_geom=0,
            scale_residue=False, scan_layers=self.scan_layers, remat=self.remat,  # type: ignore[arg-type]
        )

    def validate(self) -> None:
        if self.remat not in ("none", "minimal", "full"):
            raise ValueError(f"decoder.remat must be none, minimal or full, got {self.remat!r}")
        if self.all_atom and not self.sequence_conditioning:
            raise ValueError("decoder.all_atom builds side chains for a given sequence: it needs decoder.sequence_conditioning")
        self.trunk_config().validate()


# Sizes: the released tokenizer, and the paper's stage-1 decoder.
RELEASED_ENCODER = EncoderConfig()
RELEASED_DECODER = DecoderConfig()
STAGE1_DECODER = DecoderConfig(d_model=1024, n_heads=16, n_layers=8, inverse_folding_head=True)


# --- encoder ------------------------------------------------------------------------------------


def knn_neighbours(
    ca_BxLx3: jnp.ndarray,
    frame_mask_BxL: jnp.ndarray,
    valid_BxL: jnp.ndarray,
    sequence_id_BxL: jnp.ndarray,
    k: int,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(edges_BxLxK, edge_ok_BxLxK): each residue's k nearest residues, nearest first.

    Neighbour 0 is the residue itself (distance 0). A pair where either residue has no frame is
    ranked by sequence separation behind all real distances, so a residue with missing atoms
    still gets its sequence neighbours. Pairs across padding or sequence boundaries rank last and
    come back with edge_ok False (only happens when a sequence has fewer than k residues).
    """
    ca = jnp.where(frame_mask_BxL[..., None], ca_BxLx3, 0.0).astype(jnp.float32)
    L = ca.shape[1]
    # Direct differences (not the |a|^2+|b|^2-2ab expansion) so that near-ties are ordered by
    # the same rounded numbers as the reference.
    dist_BxLxL = jnp.linalg.norm(ca[:, :, None, :] - ca[:, None, :, :], axis=-1)
    pos = jnp.arange(L)
    seq_sep_LxL = jnp.abs(pos[:, None] - pos[None, :]).astype(jnp.float32)
    both_framed = frame_mask_BxL[:, :, None] & frame_mask_BxL[:, None, :]
    dist_BxLxL = jnp.where(both_framed, dist_BxLxL, _NO_COORDS_DISTANCE + 100.0 * seq_sep_LxL)
    same = (sequence_id_BxL[:, :, None] == sequence_id_BxL[:, None, :]) & valid_BxL[:, :, None] & valid_BxL[:, None, :]
    dist_BxLxL = jnp.where(same, dist_BxLxL, jnp.inf)
    neg_d, edges = jax.lax.top_k(-jax.lax.stop_gradient(dist_BxLxL), min(k, L))
    return edges, jnp.isfinite(neg_d)


def _gather_neighbours(values_BxL, edges_BxLxK):
    """values (B, L, ...) -> (B*L, K, ...): each residue's neighbours' values."""
    B, L, K = edges_BxLxK.shape
    g = jax.vmap(lambda v, e: v[e])(values_BxL, edges_BxLxK)
    return g.reshape(B * L, K, *values_BxL.shape[2:])


class EncoderBlock(nn.Module):
    """Geometric attention then a biased SwiGLU FFN, residual scale 1, no plain attention."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x_NxKxD, rot, trans, frame_mask, sequence_id, chain_id, query_only: bool = False):
        cfg = self.config
        g = GeometricAttention(cfg.d_model, cfg.v_heads, use_bias=True, mask_and_zero_frameless=False, name="geom_attn")(
            x_NxKxD, rot, trans, frame_mask, sequence_id, chain_id, n_queries=1 if query_only else None
        )
        x = (x_NxKxD[:, :1] if query_only else x_NxKxD) + g
        return x + SwiGLU(cfg.d_model, cfg.ffn_hidden, use_bias=True, name="ffn")(x)


class StructureEncoder(nn.Module):
    config: EncoderConfig

    def setup(self):
        cfg = self.config
        n_rel = 2 * cfg.relpos_bins + 2  # +-bins, and an index 0 the clamp never produces
        self.relpos_embed = param(self, "relpos_embed", (n_rel, cfg.d_model), (None, EMBED), nn.initializers.normal(0.02))
        self.blocks = [EncoderBlock(cfg, name=f"block_{i}") for i in range(cfg.n_layers)]
        self.pre_vq_kernel = param(self, "pre_vq_proj", (cfg.d_model, cfg.d_out), (EMBED, None), fan_in_init())
        self.pre_vq_bias = param(self, "pre_vq_proj_bias", (cfg.d_out,), (None,), nn.initializers.zeros)
        self.codebook = EMACodebook(
            cfg.n_codes, cfg.d_out, cfg.ema_decay, cfg.restart_threshold, cfg.commitment_weight, name="codebook"
        )

    def __call__(self, coords, residue_index=None, sequence_id=None, attention_mask=None, update_codebook=False):
        return self.encode(coords, residue_index, sequence_id, attention_mask, update_codebook)

    def encode_continuous(self, coords_BxLx3x3, residue_index_BxL=None, sequence_id_BxL=None, attention_mask_BxL=None):
        """(pre-quantisation z_BxLxC, mask_BxL of residues that have a token of their own)."""
        cfg = self.config
        coords = jnp.asarray(coords_BxLx3x3, jnp.float32)[..., :3, :]
        B, L = coords.shape[:2]
        rot, trans, frame_mask = backbone_frames(coords)
        valid = jnp.ones((B, L), bool) if attention_mask_BxL is None else jnp.asarray(attention_mask_BxL, bool)
        seq_id = jnp.zeros((B, L), jnp.int32) if sequence_id_BxL is None else jnp.asarray(sequence_id_BxL)
        edges_BxLxK, edge_ok_BxLxK = knn_neighbours(coords[:, :, 1], frame_mask, valid, seq_id, cfg.knn)
        K = edges_BxLxK.shape[-1]

        n_rot = _gather_neighbours(rot, edges_BxLxK)
        n_trans = _gather_neighbours(trans, edges_BxLxK)
        # Unlike the reference, a neighbour across a padding or sequence boundary (chosen only
        # when a sequence is shorter than k) is hidden like a frameless one instead of attended.
        n_mask = _gather_neighbours(frame_mask, edges_BxLxK) & edge_ok_BxLxK.reshape(B * L, K)
        n_seq = _gather_neighbours(seq_id, edges_BxLxK)
        n_chain = jnp.zeros_like(n_seq)
        res_idx = (
            jnp.broadcast_to(jnp.arange(L)[None], (B, L)) if residue_index_BxL is None else jnp.asarray(residue_index_BxL)
        )
        n_res = _gather_neighbours(res_idx, edges_BxLxK)
        rel = jnp.clip(n_res - n_res[:, :1], -cfg.relpos_bins, cfg.relpos_bins) + cfg.relpos_bins + 1
        x_NxKxD = jnp.take(self.relpos_embed, rel, axis=0)

        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            x_NxKxD = block(x_NxKxD, n_rot, n_trans, n_mask, n_seq, n_chain, query_only=last)
        z_BxLxD = x_NxKxD[:, 0].reshape(B, L, cfg.d_model)
        has_token = frame_mask & valid
        z_BxLxD = jnp.where(has_token[..., None], z_BxLxD, 0.0)
        return z_BxLxD @ self.pre_vq_kernel + self.pre_vq_bias, has_token

    def encode(self, coords_BxLx3x3, residue_index_BxL=None, sequence_id_BxL=None, attention_mask_BxL=None,
               update_codebook=False):
        """Dict with tokens (B, L), quantised (straight-through) z_q, z, mask, commitment, metrics.

        A residue without a frame still gets the code nearest to the encoding of an all-zero
        state, as in the reference; `mask` says which tokens carry structure.
        """
        z, mask = self.encode_continuous(coords_BxLx3x3, residue_index_BxL, sequence_id_BxL, attention_mask_BxL)
        z_q, tokens, commitment, metrics = self.codebook(z, mask, update=update_codebook)
        return {"tokens": tokens, "z_q": z_q, "z": z, "mask": mask, "commitment": commitment, "metrics": metrics}


# --- decoder ------------------------------------------------------------------------------------


class StructureDecoder(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, structure_tokens_BxL, sequence_id_BxL=None, attention_mask_BxL=None, sequence_BxL=None,
                 code_embeddings_BxLxD=None):
        """Decode framed structure tokens (BOS, codes..., EOS, PAD...) to backbone and confidences.

        sequence_BxL: amino-acid indices into AMINO_ACIDS (20 = unknown), for sequence conditioning.
        code_embeddings_BxLxD: training only; replaces the token table's rows at code positions
        with embeddings computed from the (straight-through) quantised vectors, so the decoder's
        loss reaches the encoder. `train.vqvae.model.fold_code_embeddings` writes the same map into the
        table afterwards, which is all the decoder needs at inference.
        """
        cfg = self.config
        tokens = jnp.asarray(structure_tokens_BxL, jnp.int32)
        B, L = tokens.shape
        valid = tokens != T.STRUCTURE_PAD if attention_mask_BxL is None else jnp.asarray(attention_mask_BxL, bool)
        seq_id = jnp.zeros((B, L), jnp.int32) if sequence_id_BxL is None else jnp.asarray(sequence_id_BxL)

        table = param(self, "token_embed", (T.STRUCTURE_VOCAB_SIZE, cfg.d_model), ("input_vocab", EMBED), nn.initializers.normal(1.0))
        x_BxLxD = jnp.take(table, tokens, axis=0)
        if code_embeddings_BxLxD is not None:
            is_code = (tokens < T.STRUCTURE_CODEBOOK_SIZE)[..., None]
            x_BxLxD = jnp.where(is_code, code_embeddings_BxLxD.astype(x_BxLxD.dtype), x_BxLxD)
        if cfg.sequence_conditioning:
            if sequence_BxL is None:
                raise ValueError("this decoder is sequence-conditioned: pass the amino-acid sequence")
            aa = param(self, "sequence_embed", (N_AMINO_ACIDS + 1, cfg.d_model), ("input_vocab", EMBED), nn.initializers.normal(1.0))
            x_BxLxD = x_BxLxD + jnp.take(aa, jnp.asarray(sequence_BxL, jnp.int32), axis=0)

        # The reference ignores its attention mask and lets every token see the padding; masking
        # padded keys makes a chain's decoding independent of what it is batched with.
        mask_BxLxL = (seq_id[:, :, None] == seq_id[:, None, :]) & valid[:, None, :]
        h = Trunk(cfg.trunk_config(), name="trunk")(x_BxLxD, mask_BxLxL, None)
        h = LayerNorm(use_bias=False, name="final_norm")(h)

        frames = FrameHead(cfg.d_model, name="frame_head")(h)
        pair_logits = PairwiseHead(cfg.d_model, name="pairwise_head")(h)
        n_dist, n_dir, _ = PAIRWISE_SPLITS
        plddt_logits = RegressionHead(cfg.d_model, N_PLDDT_BINS, out_axis=None, name="plddt_head")(h).astype(jnp.float32)
        is_code = (tokens < T.STRUCTURE_CODEBOOK_SIZE) & valid
        pae_logits = pair_logits[..., n_dist + n_dir:]
        out = {
            "backbone": frames["backbone"],  # (B, L, 3, 3) N, CA, C in Å
            "rot": frames["rot"],
            "trans": frames["trans"],
            "torsions": frames["torsions"],
            "plddt": expected_plddt(plddt_logits),
            "plddt_logits": plddt_logits,
            "pae": predicted_aligned_error(pae_logits, is_code),
            "ptm": predicted_tm(pae_logits, is_code),
            "distogram_logits": pair_logits[..., :n_dist],
            "direction_logits": pair_logits[..., n_dist:n_dist + n_dir],
            "pae_logits": pae_logits,
        }
        if cfg.all_atom:
            # BOS/EOS/PAD read as unknown residues (index 20): backbone atoms only.
            aatype = jnp.asarray(sequence_BxL, jnp.int32)
            atom14, atom14_mask = atom14_from_frames(frames["rot"], frames["trans"], aatype, frames["torsions"])
            atom37, atom37_mask = atom14_to_atom37(atom14, aatype)
            out.update(atom14=atom14, atom14_mask=atom14_mask, atom37=atom37, atom37_mask=atom37_mask)
        if cfg.inverse_folding_head:
            out["sequence_logits"] = RegressionHead(cfg.d_model, N_AMINO_ACIDS, out_axis=None, name="sequence_head")(h)
        return out
