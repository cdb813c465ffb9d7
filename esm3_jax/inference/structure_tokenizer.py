"""The structure tokenizer: load an encoder or decoder checkpoint, turn chains into tokens and
tokens into backbones (all heavy atoms for an all-atom decoder).

The weights come from `esm3-jax convert` (compat/tokenizer_weights.py) or from `train-vqvae`.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import numpy as np

from esm3_jax import tokens as T
from esm3_jax.compat.params_io import DECODER_KIND, ENCODER_KIND, load_params
from esm3_jax.config import from_dict
from esm3_jax.model.vqvae import DecoderConfig, EncoderConfig, StructureDecoder, StructureEncoder, aa_indices
from esm3_jax.structure import geometry
from esm3_jax.structure.chain import ProteinChain

# --- tokenizer API ------------------------------------------------------------------------------

LENGTH_BUCKET = 64  # inputs are padded to a multiple of this, so few lengths get compiled


def _bucket(n: int) -> int:
    return max(LENGTH_BUCKET, -(-n // LENGTH_BUCKET) * LENGTH_BUCKET)


def load_encoder(directory: str | Path) -> tuple[EncoderConfig, dict]:
    kind, config, variables = load_params(directory)
    if kind != ENCODER_KIND:
        raise ValueError(f"{directory}: a '{kind}' checkpoint, not a {ENCODER_KIND}")
    return from_dict(EncoderConfig, config, f"{directory} model"), variables


def load_decoder(directory: str | Path) -> tuple[DecoderConfig, dict]:
    kind, config, variables = load_params(directory)
    if kind != DECODER_KIND:
        raise ValueError(f"{directory}: a '{kind}' checkpoint, not a {DECODER_KIND}")
    return from_dict(DecoderConfig, config, f"{directory} model"), variables


# One compiled function per model shape, shared by every tokenizer of that shape (the weights
# are arguments), so reloading a checkpoint does not recompile.
@functools.lru_cache(maxsize=8)
def _jitted_encoder(cfg: EncoderConfig):
    model = StructureEncoder(cfg)
    return jax.jit(lambda v, c, r, m: model.apply(v, c, r, None, m, method=StructureEncoder.encode))


@functools.lru_cache(maxsize=8)
def _jitted_decoder(cfg: DecoderConfig):
    model = StructureDecoder(cfg)
    return jax.jit(lambda v, t, s: model.apply(v, t, sequence_BxL=s))


@dataclasses.dataclass(frozen=True)
class StructureTokenizer:
    """Chains -> tokens (encoder) and tokens -> backbones (decoder); either half may be absent."""

    encoder_config: EncoderConfig | None = None
    encoder_variables: dict | None = None
    decoder_config: DecoderConfig | None = None
    decoder_variables: dict | None = None

    @classmethod
    def load(cls, encoder_dir: str | Path | None = None, decoder_dir: str | Path | None = None) -> "StructureTokenizer":
        enc = load_encoder(encoder_dir) if encoder_dir else (None, None)
        dec = load_decoder(decoder_dir) if decoder_dir else (None, None)
        return cls(*enc, *dec)

    @property
    def _encode_fn(self):
        return _jitted_encoder(self.encoder_config)

    @property
    def _decode_fn(self):
        return _jitted_decoder(self.decoder_config)

    def tokenize(self, backbone_Lx3x3: np.ndarray, residue_index_L: np.ndarray | None = None) -> np.ndarray:
        """(L,) int32 codes; -1 where the residue has no complete N/CA/C backbone.

        NaN, infinite or absurd (>= 1e6 Å) coordinates mark a residue as missing, as the model's
        frame mask does. Raises ValueError when no residue has a backbone.
        """
        if self.encoder_config is None:
            raise ValueError("no encoder loaded")
        bb = np.asarray(backbone_Lx3x3, np.float32)
        if bb.ndim != 3 or bb.shape[1:] != (3, 3):
            raise ValueError(f"backbone must be (L, 3, 3) N/CA/C coordinates, got shape {bb.shape}")
        L = bb.shape[0]
        with np.errstate(invalid="ignore"):
            has = (np.isfinite(bb) & (np.abs(bb) < 1e6)).all((-1, -2))
        if not has.any():
            raise ValueError(f"none of the {L} residues has finite N, CA and C coordinates")
        P = _bucket(L)
        coords = np.full((1, P, 3, 3), np.nan, np.float32)
        coords[0, :L] = np.where(has[:, None, None], bb, np.nan)
        res = np.zeros((1, P), np.int32)
        res[0, :L] = np.arange(L) if residue_index_L is None else residue_index_L
        valid = np.zeros((1, P), bool)
        valid[0, :L] = True
        out = self._encode_fn(self.encoder_variables, coords, res, valid)
        tokens = np.asarray(out["tokens"])[0, :L]
        return np.where(has, tokens, -1).astype(np.int32)

    def decode(self, tokens_L: np.ndarray, sequence: str | None = None) -> dict[str, Any]:
        """backbone (L, 3, 3), plddt (L,) in [0, 1], pae (L, L) in Å, ptm: from per-residue codes
        (-1 = unknown, decoded as MASK); an all-atom decoder adds atom37 (L, 37, 3), NaN in the
        slots the residue type lacks."""
        if self.decoder_config is None:
            raise ValueError("no decoder loaded")
        framed = T.encode_structure_tokens(tokens_L)  # validates the ids; adds BOS/EOS
        L = len(framed) - 2
        P = _bucket(L + 2)
        toks = np.full((1, P), T.STRUCTURE_PAD, np.int32)
        toks[0, : L + 2] = framed
        seq = None
        if self.decoder_config.sequence_conditioning:
            if sequence is None or len(sequence) != L:
                raise ValueError(f"this decoder needs the {L}-residue amino-acid sequence")
            seq = np.full((1, P), 20, np.int32)
            seq[0, 1 : L + 1] = aa_indices(sequence)
        out = self._decode_fn(self.decoder_variables, toks, seq)
        result = {
            "backbone": np.asarray(out["backbone"])[0, 1 : L + 1],
            "plddt": np.asarray(out["plddt"])[0, 1 : L + 1],
            "pae": np.asarray(out["pae"])[0, 1 : L + 1, 1 : L + 1],
            "ptm": float(np.asarray(out["ptm"])[0]),
        }
        if self.decoder_config.all_atom:
            mask = np.asarray(out["atom37_mask"])[0, 1 : L + 1]
            result["atom37"] = np.where(mask[..., None], np.asarray(out["atom37"])[0, 1 : L + 1], np.nan).astype(np.float32)
        return result


def decoded_chain(decoded: dict[str, Any], sequence: str, chain_id: str = "A") -> ProteinChain:
    """A chain to write from `StructureTokenizer.decode`'s output: every heavy atom an all-atom
    decoder built, else N, CA, C and the geometrically placed O; pLDDT x 100 as the B-factors."""
    b_factor = 100.0 * np.asarray(decoded["plddt"], np.float32)
    if decoded.get("atom37") is not None:
        return ProteinChain.from_coords(sequence, decoded["atom37"], chain_id=chain_id, b_factor=b_factor)
    chain = ProteinChain.from_coords(sequence, decoded["backbone"], chain_id=chain_id, b_factor=b_factor)
    return dataclasses.replace(chain, coords=geometry.with_oxygen(chain.coords))
