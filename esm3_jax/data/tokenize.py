"""One protein as read (a RawProtein) -> its record (a ProteinRecord): every track validated and
tokenized, or a SourceError naming the reason it is rejected. Preprocessing runs this per record,
on whichever worker the record lands.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from esm3_jax import tokens as T
from esm3_jax.data import function_tokens as ft
from esm3_jax.data import records
from esm3_jax.data import sources as src

# Residue letters a protein may hold; tokens.py also accepts gap, chain-break and mask symbols, which
# in a raw input mean a malformed record rather than a residue.
_RESIDUE_LETTERS = frozenset("LAGVSERTIDPKQNFYMHWCXBUZO")
# Letters counted as unknown residues by `max_unknown_fraction`: X alone. tokens.py maps no letter to
# <unk> (it rejects anything outside its vocabulary); B (D or N) and Z (E or Q) are ambiguous but still
# say something, and U (selenocysteine) and O (pyrrolysine) are real residues. Structure chains write
# unknown or non-standard residues as X (residue_constants.UNKNOWN_RESIDUE).
UNKNOWN_LETTERS = frozenset("X")


class StructureEncoderUnavailable(ValueError):
    """--structure-encoder was given but the structure tokenizer is not part of this installation."""


@dataclasses.dataclass(frozen=True)
class Tokenizers:
    """Per-worker state, loaded once: the function vocabulary and the structure encoder."""

    function_vocab: ft.FunctionVocab | None = None
    # (backbone (L, 3, 3), author residue numbers (L,)) -> codes (L,), -1 where no backbone
    structure_encoder: Callable[[np.ndarray, np.ndarray | None], np.ndarray] | None = None


def _sequence_tokens(seq: str) -> np.ndarray:
    bad = sorted(set(seq) - _RESIDUE_LETTERS)
    if bad:
        raise src.SourceError("unknown letters", f"sequence holds {''.join(bad)[:20]!r}")
    return T.encode_sequence(seq, add_special_tokens=False)


def _track(encode: Callable[[], np.ndarray], what: str, length: int, reason: str | None = None) -> np.ndarray:
    """Run a tokens.py encoder; its TokenError, or a length that does not match, rejects the protein."""
    try:
        ids = encode()
    except T.TokenError as e:
        raise src.SourceError(reason or f"bad {what}", str(e)) from None
    if len(ids) != length:
        raise src.SourceError("length mismatch", f"{length} residues, {what} has {len(ids)}")
    return ids


def to_record(
    raw: src.RawProtein, tok: Tokenizers, min_length: int, max_unknown_fraction: float = 1.0
) -> records.ProteinRecord:
    """Validate and tokenize one protein. Raises SourceError with the reject reason.

    Rejects a chain shorter than `min_length` ("too short") and one whose fraction of unknown residues
    (X) is above `max_unknown_fraction` ("too many unknown residues")."""
    L = len(raw.sequence)
    if L == 0:
        raise src.SourceError("empty", "no residues")
    seq = _sequence_tokens(raw.sequence)
    if L < min_length:
        raise src.SourceError("too short", f"{L} residues, minimum {min_length}")
    n_unknown = sum(raw.sequence.count(c) for c in UNKNOWN_LETTERS)
    if n_unknown > max_unknown_fraction * L:
        raise src.SourceError(
            "too many unknown residues",
            f"{n_unknown} of {L} residues are X, maximum fraction {max_unknown_fraction:g}",
        )
    fields: dict = {}
    if raw.ss8 is not None:
        fields["ss8_tokens"] = _track(
            lambda: T.encode_ss8(raw.ss8, False), "secondary structure", L, reason="unknown letters"
        )
    if raw.sasa is not None:
        fields["sasa_tokens"] = _track(lambda: T.sasa_to_tokens(raw.sasa, False), "SASA", L)
    if raw.coordinates is not None:
        backbone_L = np.isfinite(raw.coordinates).all(axis=(1, 2))
        if not backbone_L.any():
            raise src.SourceError("no backbone", "no residue has N, CA and C coordinates")
        fields["coordinates"] = raw.coordinates
        if tok.structure_encoder is not None:
            codes_L = tok.structure_encoder(raw.coordinates, raw.residue_index)
            fields["structure_tokens"] = _track(
                lambda: T.encode_structure_tokens(codes_L, False), "structure tokens", L
            )
    if raw.plddt is not None:
        fields["plddt"] = raw.plddt
    if raw.chain_id is not None:
        fields["chain_id"] = raw.chain_id
    if raw.function is not None and tok.function_vocab is not None:
        try:
            fields["function_tokens"] = ft.tokenize_function_annotations(tok.function_vocab, raw.function, L)
        except ft.FunctionLabelError as e:
            raise src.SourceError("bad function label", str(e)) from None
    if raw.residue_annotations is not None:
        fields["residue_annotation_tokens"] = _track(
            lambda: T.encode_residue_annotations(raw.residue_annotations, L, False), "residue annotations", L
        )
    return records.ProteinRecord(id=raw.id, source=raw.source, sequence_tokens=seq, **fields)


# --- tokenizers, loaded once per worker ---------------------------------------------------------------


def load_structure_encoder(directory: str) -> Callable[[np.ndarray, np.ndarray | None], np.ndarray]:
    """The VQ-VAE structure encoder of a checkpoint folder, as (backbone, residue numbers) -> codes.

    Errors clearly when the structure tokenizer is not part of this installation; never invents tokens.
    """
    try:
        from esm3_jax.inference import structure_tokenizer
    except ModuleNotFoundError as e:
        if e.name != "esm3_jax.inference.structure_tokenizer":
            raise
        raise StructureEncoderUnavailable(
            "structure tokenizer not available: esm3_jax.inference.structure_tokenizer is not part of this installation; "
            "preprocess without --structure-encoder (records keep coordinates, SS8, SASA and pLDDT)"
        ) from None
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"structure encoder checkpoint folder not found: {directory}")
    return structure_tokenizer.StructureTokenizer.load(encoder_dir=directory).tokenize


def load_tokenizers(function_vocab: str | None, structure_encoder: str | None) -> Tokenizers:
    """The function vocabulary (a save_function_vocab directory) and the structure encoder (a
    checkpoint directory), each only when named."""
    vocab = ft.load_function_vocab_dir(function_vocab) if function_vocab else None
    encoder = load_structure_encoder(structure_encoder) if structure_encoder else None
    return Tokenizers(vocab, encoder)
