"""Every ESM3 vocabulary and special id (ESM3_SPEC section 1), with encode/decode. Pure numpy.

The ids must equal the reference release's so that converted weights read the same tokens.

Conventions shared by every function here:

* Every track of a protein of L residues has length L+2: position 0 holds the track's BOS id and
  position L+1 its EOS id. Encoders take ``add_special_tokens=True`` to add that framing; decoders
  take ``strip_special=True`` to check and remove it (a decoder raises if the framing is missing, since
  that is how an off-by-one between tracks shows up).
* Token arrays are ``np.int32``; float arrays (SASA, pLDDT, coordinates) are ``np.float32``.
* Bad input raises :class:`TokenError` (a ``ValueError``) whose message names the track, the offending
  value and its 1-based position in the input.
* In user-facing strings ``_`` means "masked" (the reference's ``MASK_STR_SHORT``), on every track.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

# --- sequence track -------------------------------------------------------------------------
SEQUENCE_VOCAB = (
    ["<cls>", "<pad>", "<eos>", "<unk>"]
    + list("LAGVSERTIDPKQNFYMHWC")
    + ["X", "B", "U", "Z", "O", ".", "-", "|", "<mask>"]
)
SEQUENCE_BOS = 0
SEQUENCE_PAD = 1
SEQUENCE_EOS = 2
SEQUENCE_UNK = 3
SEQUENCE_CHAINBREAK = 31
SEQUENCE_MASK = 32
SEQUENCE_EMBED_ROWS = 64  # the table (and head) is padded to 64 rows; only 33 are real tokens
# Ids generation must never emit (the reference's get_invalid_tokenizer_ids: mask, pad, cls, eos).
# Sorted, so it can index a logits array directly.
SEQUENCE_NEVER_SAMPLED = (SEQUENCE_BOS, SEQUENCE_PAD, SEQUENCE_EOS, SEQUENCE_MASK)

MASK_CHAR = "_"  # "masked" in user strings, on every track

# --- structure tokens (VQ-VAE codes) ---------------------------------------------------------
STRUCTURE_CODEBOOK_SIZE = 4096
STRUCTURE_MASK = 4096
STRUCTURE_EOS = 4097
STRUCTURE_BOS = 4098
STRUCTURE_PAD = 4099
STRUCTURE_CHAINBREAK = 4100
STRUCTURE_VOCAB_SIZE = 4101
STRUCTURE_UNDEFINED = 955
STRUCTURE_NEVER_SAMPLED = (STRUCTURE_MASK, STRUCTURE_EOS, STRUCTURE_BOS, STRUCTURE_PAD)

# --- SS8 ---------------------------------------------------------------------------------------
SS8_VOCAB = ["<pad>", "<motif>", "<unk>"] + list("GHITEBSC")
SS8_PAD = 0  # also mask, BOS and EOS in the released tokenizer
SS8_VOCAB_SIZE = 11
SS8_MOTIF = 1
SS8_UNK = 2
SS8_NEVER_SAMPLED = (SS8_PAD,)
# Other DSSP dialects' symbols, folded onto the 8 classes ESM3 was trained on. All are "no regular
# secondary structure", i.e. the reference's coil class C:
#   'L'  coil in the sidechainnet dssp8 strings (../shared/data/sequences);
#   ' '  coil in mkdssp's classic output; '-' and '.' coil in other writers (and mmCIF's "no value");
#   'P'  polyproline-II helix, which mkdssp >= 4 assigns but the DSSP that labelled ESM3's training
#        data predates (there such residues were coil).
SS8_ALIASES = {"L": "C", " ": "C", "-": "C", ".": "C", "P": "C"}

# --- SASA --------------------------------------------------------------------------------------
SASA_BIN_EDGES = (0.8, 4.0, 9.6, 16.4, 24.5, 32.9, 42.0, 51.5, 61.2, 70.9, 81.6, 93.3, 107.2, 125.4, 151.4)
SASA_PAD = 0  # also mask, BOS and EOS
SASA_VOCAB_SIZE = 19
SASA_MOTIF = 1
SASA_UNK = 2
SASA_FIRST_BIN = 3  # token id of the bin [0, 0.8]
SASA_NUM_BINS = len(SASA_BIN_EDGES) + 1
SASA_NEVER_SAMPLED = (SASA_PAD,)

# --- function tokens ---------------------------------------------------------------------------
FUNCTION_DEPTH = 8
FUNCTION_VOCAB_SIZE = 260
FUNCTION_PAD = 0  # also mask, BOS and EOS
FUNCTION_MOTIF = 1
FUNCTION_UNK = 2
FUNCTION_NONE = 3
FUNCTION_LSH_OFFSET = 4
FUNCTION_LSH_VALUES = FUNCTION_VOCAB_SIZE - FUNCTION_LSH_OFFSET  # 256: 8 bits per table
FUNCTION_NEVER_SAMPLED = (FUNCTION_PAD,)

# --- residue annotations -----------------------------------------------------------------------
RESIDUE_VOCAB_SIZE = 1478
RESIDUE_MAX_ANNOTATIONS = 16
RESIDUE_PAD = 0
RESIDUE_MOTIF = 1
RESIDUE_UNK = 2
RESIDUE_NONE = 3  # "this residue of an annotated protein carries no site label"
RESIDUE_FIRST_LABEL = 4  # ids 4..1477 are the InterPro site labels

# --- pLDDT --------------------------------------------------------------------------------------
PLDDT_RBF_BINS = 16


class TokenError(ValueError):
    """Input that cannot be tokenized (or ids that cannot be decoded); the message says where."""


# --- shared helpers ------------------------------------------------------------------------------


def _ids_1d(ids, track: str, vocab_size: int) -> np.ndarray:
    """`ids` as a 1-D int32 array, checked to lie in [0, vocab_size)."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise TokenError(f"{track}: expected a 1-D array of token ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TokenError(f"{track}: expected integer token ids, got dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        raise TokenError(
            f"{track}: token id {int(arr[bad[0]])} at position {bad[0] + 1} is outside 0..{vocab_size - 1}"
        )
    return arr.astype(np.int32)


def _frame(body: np.ndarray, bos, eos) -> np.ndarray:
    """Add the BOS row in front of and the EOS row after `body` (rows along axis 0)."""
    first = np.full((1, *body.shape[1:]), bos, dtype=body.dtype)
    last = np.full((1, *body.shape[1:]), eos, dtype=body.dtype)
    return np.concatenate([first, body, last], axis=0)


def _unframe(ids: np.ndarray, bos, eos, track: str) -> np.ndarray:
    """Check that `ids` starts with BOS and ends with EOS (whole rows), and drop them."""
    if ids.shape[0] < 2:
        raise TokenError(f"{track}: {ids.shape[0]} positions cannot hold both BOS and EOS")
    if not (np.all(ids[0] == bos) and np.all(ids[-1] == eos)):
        raise TokenError(
            f"{track}: expected BOS {bos} at the first position and EOS {eos} at the last, "
            f"got {ids[0].tolist()} and {ids[-1].tolist()} (pass strip_special=False for unframed ids)"
        )
    return ids[1:-1]


# One symbol is a single character or a bracketed vocabulary word such as "<unk>".
_SYMBOL_RE = re.compile(r"<[^<>]*>|.", re.DOTALL)


class _SymbolTable:
    """String -> id lookup for character-level vocabularies, with a vectorised ASCII fast path."""

    def __init__(self, track: str, symbols: Mapping[str, int], hint: str = ""):
        self.track = track
        self.symbols = dict(symbols)
        self.hint = hint
        self.ascii_lut = np.full(128, -1, dtype=np.int32)
        for sym, idx in self.symbols.items():
            if len(sym) == 1 and ord(sym) < 128:
                self.ascii_lut[ord(sym)] = idx

    def encode(self, text: str) -> np.ndarray:
        if not isinstance(text, str):
            raise TokenError(f"{self.track}: expected a string, got {type(text).__name__}")
        if "<" not in text and text.isascii():
            ids = self.ascii_lut[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
            bad = np.flatnonzero(ids < 0)
            if not bad.size:
                return ids
            self._raise(text[bad[0]], int(bad[0]))
        ids = []
        for match in _SYMBOL_RE.finditer(text):
            idx = self.symbols.get(match.group())
            if idx is None:
                self._raise(match.group(), match.start())
            ids.append(idx)
        return np.asarray(ids, dtype=np.int32)

    def _raise(self, symbol: str, offset: int):
        if symbol == "<":
            what = "unterminated '<'"
        else:
            what = f"{'token' if len(symbol) > 1 else 'character'} {symbol!r}"
        raise TokenError(
            f"{self.track}: {what} at position {offset + 1} is not in the ESM3 {self.track} vocabulary{self.hint}"
        )


# --- sequence ------------------------------------------------------------------------------------

_SEQUENCE_TABLE = _SymbolTable(
    "sequence",
    {**{tok: i for i, tok in enumerate(SEQUENCE_VOCAB)}, MASK_CHAR: SEQUENCE_MASK},
    hint=" (upper-case one-letter codes, X, B, U, Z, O, '.', '-', '|' chain break, '_' mask)",
)


def encode_sequence(seq: str, add_special_tokens: bool = True) -> np.ndarray:
    """Amino-acid string -> int32 ids, ``<cls>`` (0) ... ``<eos>`` (2) around them if asked.

    Character-level, like the reference's BPE-without-merges tokenizer: each of
    ``LAGVSERTIDPKQNFYMHWC XBUZO . - |`` is one token, ``_`` is ``<mask>`` (32) and ``|`` the chain
    break (31). Bracketed vocabulary words (``<mask>``, ``<unk>``, ``<pad>``, ``<cls>``, ``<eos>``) are
    also read as single tokens, so ``decode_sequence(..., strip_special=False)`` output encodes back.

    Case is *not* normalised: lower-case letters raise, as does any symbol outside the vocabulary
    (the reference would silently turn them into ``<unk>``); lower case often carries meaning
    (soft-masked repeats, A3M insertions) that the caller should resolve explicitly.
    """
    ids = _SEQUENCE_TABLE.encode(seq)
    return _frame(ids, SEQUENCE_BOS, SEQUENCE_EOS) if add_special_tokens else ids


def decode_sequence(ids, strip_special: bool = True) -> str:
    """int ids -> string; ``<mask>`` becomes ``_``, every other id its vocabulary text.

    With ``strip_special`` the framing and padding ids (``<cls>``, ``<eos>``, ``<pad>``) are dropped
    wherever they occur (so right-padded batch rows decode too); ``<unk>`` stays as ``"<unk>"`` so the
    result encodes back to the same residues. Ids 33..63 (embedding-table padding rows) raise.
    """
    arr = _ids_1d(ids, "sequence", len(SEQUENCE_VOCAB))
    if strip_special:
        arr = arr[~np.isin(arr, (SEQUENCE_BOS, SEQUENCE_EOS, SEQUENCE_PAD))]
    return "".join(MASK_CHAR if i == SEQUENCE_MASK else SEQUENCE_VOCAB[i] for i in arr.tolist())


# --- structure tokens ----------------------------------------------------------------------------


def encode_structure_tokens(codes, add_special_tokens: bool = True) -> np.ndarray:
    """VQ-VAE codes (0..4095 per residue; -1 or None = unknown) -> int32 ids.

    Unknown residues become MASK (4096), as ``ESM3.forward`` does with -1; the framing is BOS 4098 and
    EOS 4097. Codes outside 0..4095 raise naming the (1-based) position. Chain-break and pad ids are
    not accepted here: ``encode_protein`` places them from the sequence track, like the reference.
    """
    values = list(codes) if not isinstance(codes, np.ndarray) else codes
    if isinstance(values, list):
        for pos, code in enumerate(values):
            if code is not None and not isinstance(code, (int, np.integer)):
                raise TokenError(f"structure: code {code!r} at position {pos + 1} is not an integer")
        values = np.asarray([-1 if c is None else int(c) for c in values], dtype=np.int64)
    elif values.ndim != 1 or (values.size and not np.issubdtype(values.dtype, np.integer)):
        raise TokenError(f"structure: expected a 1-D integer array of codes, got {values.dtype} {values.shape}")
    bad = np.flatnonzero((values < -1) | (values >= STRUCTURE_CODEBOOK_SIZE))
    if bad.size:
        raise TokenError(
            f"structure: code {int(values[bad[0]])} at position {bad[0] + 1} is outside "
            f"0..{STRUCTURE_CODEBOOK_SIZE - 1} (use -1 or None for unknown)"
        )
    ids = np.where(values == -1, STRUCTURE_MASK, values).astype(np.int32)
    return _frame(ids, STRUCTURE_BOS, STRUCTURE_EOS) if add_special_tokens else ids


def decode_structure_tokens(ids, strip_special: bool = True) -> np.ndarray:
    """int ids -> int32 codes, with -1 wherever the id is not a code (mask, pad, chain break).

    With ``strip_special`` the ids must start with BOS (4098) and end with EOS (4097); both are dropped.
    """
    arr = _ids_1d(ids, "structure", STRUCTURE_VOCAB_SIZE)
    if strip_special:
        arr = _unframe(arr, STRUCTURE_BOS, STRUCTURE_EOS, "structure")
    return np.where(arr < STRUCTURE_CODEBOOK_SIZE, arr, -1).astype(np.int32)


# --- SS8 -------------------------------------------------------------------------------------------

_SS8_TABLE = _SymbolTable(
    "SS8",
    {
        **{tok: i for i, tok in enumerate(SS8_VOCAB)},
        **{alias: SS8_VOCAB.index(cls) for alias, cls in SS8_ALIASES.items()},
        MASK_CHAR: SS8_PAD,
    },
    hint=" (DSSP classes GHITEBSC, coil as C/L/P/' '/'-'/'.', '_' mask)",
)


def encode_ss8(ss: str, add_special_tokens: bool = True) -> np.ndarray:
    """DSSP string -> int32 ids (G H I T E B S C = 3..10), id 0 (pad = mask = BOS = EOS) around them.

    Accepted symbols: the eight DSSP classes ``GHITEBSC``; the coil spellings of other DSSP writers,
    folded onto ``C`` (see ``SS8_ALIASES``: ``L`` sidechainnet, ``' '`` / ``-`` / ``.`` mkdssp and
    friends, ``P`` mkdssp 4.x polyproline); ``_`` for mask (0); and the bracketed words ``<pad>``,
    ``<motif>``, ``<unk>``. Anything else (lower case included) raises naming the symbol and position.
    """
    ids = _SS8_TABLE.encode(ss)
    return _frame(ids, SS8_PAD, SS8_PAD) if add_special_tokens else ids


def decode_ss8(ids, strip_special: bool = True) -> str:
    """int ids -> DSSP string; id 0 decodes to ``_`` and ids 1, 2 to ``<motif>``, ``<unk>``.

    With ``strip_special`` the first and last ids must be 0 (BOS/EOS) and are dropped. Coil decodes as
    ``C`` whatever spelling it was encoded from.
    """
    arr = _ids_1d(ids, "SS8", SS8_VOCAB_SIZE)
    if strip_special:
        arr = _unframe(arr, SS8_PAD, SS8_PAD, "SS8")
    return "".join(MASK_CHAR if i == SS8_PAD else SS8_VOCAB[i] for i in arr.tolist())


# --- SASA ------------------------------------------------------------------------------------------

# float32 edges: the reference buckets each value with torch.bucketize against a float32 tensor, so the
# comparison happens in float32 (a float64 value a hair above 151.4 still lands in the 125.4-151.4 bin).
_SASA_EDGES_F32 = np.asarray(SASA_BIN_EDGES, dtype=np.float32)
# Bin midpoints (the reference tokenizer's midpoints_tensor, float32): the open last bin [151.4, inf)
# is represented by 151.4 * 1.5, the midpoint of [151.4, 2 * 151.4].
SASA_BIN_MIDPOINTS = (
    (np.concatenate([[0.0], SASA_BIN_EDGES]) + np.concatenate([SASA_BIN_EDGES, [2 * SASA_BIN_EDGES[-1]]])) / 2
).astype(np.float32)


def sasa_to_tokens(values_L, add_special_tokens: bool = True) -> np.ndarray:
    """Per-residue SASA (Å², >= 0) -> int32 ids ``3 + bucketize(value, SASA_BIN_EDGES)``, id 0 around them.

    Bucketing is the reference's ``torch.bucketize(value, edges)`` (``right=False``) in float32: bin i
    holds ``edges[i-1] < v <= edges[i]``, so a value exactly on an edge goes to the *lower* bin
    (0.8 -> id 3) and ``+inf`` to the last bin (id 18).

    Missing values: ``None`` (in a list) means masked and gives id 0, as the reference's
    ``tokenize_sasa`` does. ``NaN`` (e.g. a residue without coordinates) gives ``<unk>`` (id 2): here we
    deliberately differ from the reference, whose bucketize sends NaN to the last bin (id 18, "fully
    exposed"). Negative values raise naming the position.
    """
    if isinstance(values_L, np.ndarray):
        if values_L.ndim != 1:
            raise TokenError(f"SASA: expected a 1-D array of per-residue values, got shape {values_L.shape}")
        masked = np.zeros(values_L.shape, dtype=bool)
        raw = values_L
    else:
        items = list(values_L)
        masked = np.asarray([v is None for v in items], dtype=bool)
        raw = [np.nan if v is None else v for v in items]
    try:
        values = np.asarray(raw, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError) as err:
        raise TokenError(f"SASA: values must be numbers or None ({err})") from None
    negative = np.flatnonzero(values < 0)
    if negative.size:
        raise TokenError(f"SASA: value {float(values[negative[0]])} at position {negative[0] + 1} is negative")
    ids = SASA_FIRST_BIN + np.searchsorted(_SASA_EDGES_F32, values, side="left")
    ids = np.where(np.isnan(values), SASA_UNK, ids)
    ids = np.where(masked, SASA_PAD, ids).astype(np.int32)
    return _frame(ids, SASA_PAD, SASA_PAD) if add_special_tokens else ids


def tokens_to_sasa(ids, strip_special: bool = True) -> np.ndarray:
    """int ids -> float32 SASA at the bin midpoints (151.4 * 1.5 for the last bin); NaN for ids 0, 1, 2.

    With ``strip_special`` the first and last ids must be 0 (BOS/EOS) and are dropped.
    """
    arr = _ids_1d(ids, "SASA", SASA_VOCAB_SIZE)
    if strip_special:
        arr = _unframe(arr, SASA_PAD, SASA_PAD, "SASA")
    table = np.concatenate([np.full(SASA_FIRST_BIN, np.nan, np.float32), SASA_BIN_MIDPOINTS])
    return table[arr]


def expected_sasa(probs_Lx19) -> np.ndarray:
    """SASA estimate from a distribution over the 19 SASA ids, as the reference sampler computes it.

    ``sum_k p(3+k) * midpoint_k`` over the 15 *bounded* bins only (ids 3..17; the probabilities are
    not renormalised), and ``+inf`` wherever the most likely id is the open last bin (18). Works on any
    leading shape: (..., 19) -> (...,) float32.
    """
    probs = np.asarray(probs_Lx19, dtype=np.float32)
    if probs.ndim < 1 or probs.shape[-1] != SASA_VOCAB_SIZE:
        raise TokenError(f"SASA: expected probabilities of shape (..., {SASA_VOCAB_SIZE}), got {probs.shape}")
    bounded = probs[..., SASA_FIRST_BIN : SASA_VOCAB_SIZE - 1] @ SASA_BIN_MIDPOINTS[:-1]
    return np.where(probs.argmax(-1) == SASA_VOCAB_SIZE - 1, np.inf, bounded).astype(np.float32)


# --- function tokens -------------------------------------------------------------------------------


def validate_function_tokens(tokens_Lx8, track: str = "function") -> np.ndarray:
    """Check a (L, 8) function-token array (ids 0..259) and return it as int32."""
    arr = np.asarray(tokens_Lx8)
    if arr.ndim != 2 or arr.shape[1] != FUNCTION_DEPTH:
        raise TokenError(f"{track}: expected shape (length, {FUNCTION_DEPTH}), got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TokenError(f"{track}: expected integer token ids, got dtype {arr.dtype}")
    bad = np.argwhere((arr < 0) | (arr >= FUNCTION_VOCAB_SIZE))
    if bad.size:
        pos, slot = bad[0]
        raise TokenError(
            f"{track}: token id {int(arr[pos, slot])} at position {pos + 1}, slot {slot + 1} "
            f"is outside 0..{FUNCTION_VOCAB_SIZE - 1}"
        )
    return arr.astype(np.int32)


def function_tokens_from_lsh(values_Lx8, has_annotation_L, add_special_tokens: bool = True) -> np.ndarray:
    """LSH hash values (0..255 per table) -> (L+2, 8) int32 function tokens.

    Annotated residues get ``4 + value`` in each of the 8 slots, residues without labels ``<none>`` (3)
    in all 8 (their ``values`` are ignored), and the BOS/EOS rows are pad (0).
    """
    values = np.asarray(values_Lx8)
    has = np.asarray(has_annotation_L, dtype=bool)
    if values.ndim != 2 or values.shape[1] != FUNCTION_DEPTH:
        raise TokenError(f"function: expected LSH values of shape (length, {FUNCTION_DEPTH}), got {values.shape}")
    if has.shape != (values.shape[0],):
        raise TokenError(f"function: has_annotation has shape {has.shape}, expected ({values.shape[0]},)")
    bad = np.argwhere(has[:, None] & ((values < 0) | (values >= FUNCTION_LSH_VALUES)))
    if bad.size:
        pos, slot = bad[0]
        raise TokenError(
            f"function: LSH value {int(values[pos, slot])} at position {pos + 1}, slot {slot + 1} "
            f"is outside 0..{FUNCTION_LSH_VALUES - 1}"
        )
    ids = np.where(has[:, None], FUNCTION_LSH_OFFSET + values, FUNCTION_NONE).astype(np.int32)
    return _frame(ids, FUNCTION_PAD, FUNCTION_PAD) if add_special_tokens else ids


def lsh_from_function_tokens(tokens, strip_special: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(L+2, 8) function tokens -> (values_Lx8 int32, has_annotation_L bool); the inverse of
    ``function_tokens_from_lsh``.

    Every residue row must be either all ``<none>`` (values 0, has_annotation False) or all LSH ids
    4..259; a row holding pad/motif/unk, or mixing kinds, raises naming the position.
    """
    arr = validate_function_tokens(tokens)
    if strip_special:
        arr = _unframe(arr, FUNCTION_PAD, FUNCTION_PAD, "function")
    is_lsh = arr >= FUNCTION_LSH_OFFSET
    has = is_lsh.all(axis=1)
    bad = np.flatnonzero(~has & ~(arr == FUNCTION_NONE).all(axis=1))
    if bad.size:
        raise TokenError(
            f"function: row {arr[bad[0]].tolist()} at position {bad[0] + 1} is neither all <none> (3) "
            f"nor all LSH ids ({FUNCTION_LSH_OFFSET}..{FUNCTION_VOCAB_SIZE - 1})"
        )
    values = np.where(has[:, None], arr - FUNCTION_LSH_OFFSET, 0).astype(np.int32)
    return values, has


# --- residue annotations ---------------------------------------------------------------------------


def encode_residue_annotations(
    ids_per_residue: Sequence[Iterable[int] | None] | None, length: int, add_special_tokens: bool = True
) -> np.ndarray:
    """Per-residue InterPro site ids -> (L+2, 16) int32, pad (0) rows at BOS/EOS.

    The BOS/EOS rows are included so that this track, like every other, has length L+2.

    ``ids_per_residue`` has one entry per residue (``length`` of them; ``None`` for the whole argument
    means an unannotated protein):

    * ``None``: nothing known, an all-pad row (what the reference emits for unannotated proteins);
    * an empty iterable: annotated protein, no site here, ``[<none>=3, 0, ...]`` (the reference's
      ``<none>`` token);
    * ids in 1..1477: de-duplicated (the bag is a sum, so a repeat would count twice) and sorted,
      then padded with 0. More than 16 distinct ids, ids outside 1..1477, or ``<none>`` mixed with
      other ids raise naming the 1-based position.
    """
    if ids_per_residue is None:
        ids_per_residue = [None] * length
    if len(ids_per_residue) != length:
        raise TokenError(f"residue annotations: got {len(ids_per_residue)} entries for {length} residues")
    out = np.full((length, RESIDUE_MAX_ANNOTATIONS), RESIDUE_PAD, dtype=np.int32)
    for pos, entry in enumerate(ids_per_residue):
        if entry is None:
            continue
        try:
            ids = sorted({int(i) for i in entry})
        except (TypeError, ValueError):
            raise TokenError(
                f"residue annotations: entry {entry!r} at position {pos + 1} is not a collection of integer ids"
            ) from None
        if not ids:
            ids = [RESIDUE_NONE]
        bad = [i for i in ids if not 1 <= i < RESIDUE_VOCAB_SIZE]
        if bad:
            raise TokenError(
                f"residue annotations: id {bad[0]} at position {pos + 1} is outside 1..{RESIDUE_VOCAB_SIZE - 1}"
            )
        if len(ids) > RESIDUE_MAX_ANNOTATIONS:
            raise TokenError(
                f"residue annotations: {len(ids)} distinct ids at position {pos + 1}, "
                f"at most {RESIDUE_MAX_ANNOTATIONS} fit"
            )
        if RESIDUE_NONE in ids and len(ids) > 1:
            raise TokenError(f"residue annotations: <none> (3) at position {pos + 1} is mixed with other ids {ids}")
        out[pos, : len(ids)] = ids
    return _frame(out, RESIDUE_PAD, RESIDUE_PAD) if add_special_tokens else out


def decode_residue_annotations(tokens, strip_special: bool = True) -> list[list[int] | None]:
    """(L+2, 16) ids -> per-residue lists, the inverse of ``encode_residue_annotations``.

    An all-pad row gives ``None``, a ``<none>`` row ``[]``, any other row its non-zero ids.
    """
    arr = np.asarray(tokens)
    if arr.ndim != 2 or arr.shape[1] != RESIDUE_MAX_ANNOTATIONS:
        raise TokenError(f"residue annotations: expected shape (length, {RESIDUE_MAX_ANNOTATIONS}), got {arr.shape}")
    bad = np.argwhere((arr < 0) | (arr >= RESIDUE_VOCAB_SIZE))
    if bad.size:
        raise TokenError(
            f"residue annotations: id {int(arr[tuple(bad[0])])} at position {bad[0][0] + 1} "
            f"is outside 0..{RESIDUE_VOCAB_SIZE - 1}"
        )
    if strip_special:
        arr = _unframe(arr, RESIDUE_PAD, RESIDUE_PAD, "residue annotations")
    decoded: list[list[int] | None] = []
    for row in arr.tolist():
        ids = [i for i in row if i != RESIDUE_PAD]
        decoded.append(None if not ids else [] if ids == [RESIDUE_NONE] else ids)
    return decoded


# --- pLDDT ------------------------------------------------------------------------------------------


def plddt_rbf(values, n_bins: int = PLDDT_RBF_BINS) -> np.ndarray:
    """Radial-basis expansion of pLDDT in [0, 1]: (...,) -> (..., n_bins) float32.

    Centres ``linspace(0, 1, n_bins)``, width ``1 / n_bins``, feature ``exp(-((v - c) / width)^2)``
    (spec 1.7, the reference's ``rbf(values, 0.0, 1.0, n_bins)``).
    """
    v = np.asarray(values, dtype=np.float32)[..., None]
    centres = np.linspace(0.0, 1.0, n_bins, dtype=np.float32)
    z = (v - centres) / np.float32(1.0 / n_bins)
    return np.exp(-(z**2)).astype(np.float32)


# --- all tracks of one protein ------------------------------------------------------------------------


def _check_length(track: str, got: int, expected: int) -> None:
    if got != expected:
        raise TokenError(f"{track}: length {got} does not match the sequence length {expected}")


def encode_protein(
    sequence: str,
    *,
    structure_tokens=None,
    ss8: str | None = None,
    sasa=None,
    function_tokens=None,
    residue_annotations: Sequence[Iterable[int] | None] | None = None,
    plddt=None,
    coords=None,
) -> dict[str, np.ndarray]:
    """Every ``ESM3`` model input for one protein, each of length L+2, keyed like the forward's arguments.

    Args (all per residue, length L = number of sequence tokens, chain breaks included):
      sequence: amino acids (``encode_sequence``); use ``"_" * L`` for an unknown sequence.
      structure_tokens: VQ-VAE codes (``encode_structure_tokens``; -1/None = mask).
      ss8: DSSP string (``encode_ss8``).
      sasa: SASA values (``sasa_to_tokens``).
      function_tokens: (L, 8) function token ids 0..259 (e.g. from ``function_tokens_from_lsh(...,
        add_special_tokens=False)``).
      residue_annotations: per-residue id lists (``encode_residue_annotations``).
      plddt: (L,) per-residue pLDDT in [0, 1].
      coords: (L, A, 3) coordinates with A >= 3 and atoms N, CA, C first (atom37/atom14 work); NaN
        where missing.

    Missing tracks get the reference forward's defaults: structure all MASK, SS8/SASA/function/
    residue annotations all pad (0), coordinates all NaN, chain_id and sequence_id 0 (one chain,
    one sequence: the same as the forward's ``None``). pLDDT: ``average_plddt`` is the mean of
    ``plddt`` (1.0 without it) broadcast to every position; ``per_res_plddt`` is ``plddt`` at the
    residues and 0 at BOS/EOS. Without ``plddt`` it is 1.0 where ``coords`` has a finite atom and 0
    elsewhere, which is what ``ESM3.logits`` feeds the forward (0 everywhere without coordinates).

    As in ``ESM3.forward``, the structure track is then overwritten with BOS/EOS/PAD/CHAINBREAK
    wherever the sequence holds those ids, so the dict is exactly what the model's first layer sees.
    Raises ``TokenError`` naming the track and both lengths when a track's length is not L.
    """
    seq_ids = encode_sequence(sequence, add_special_tokens=False)
    n = int(seq_ids.shape[0])
    n2 = n + 2
    out: dict[str, np.ndarray] = {"sequence_tokens": _frame(seq_ids, SEQUENCE_BOS, SEQUENCE_EOS)}

    if structure_tokens is None:
        struct = np.full(n, STRUCTURE_MASK, dtype=np.int32)
    else:
        struct = encode_structure_tokens(structure_tokens, add_special_tokens=False)
        _check_length("structure_tokens", len(struct), n)
    struct = _frame(struct, STRUCTURE_BOS, STRUCTURE_EOS)
    for seq_special, struct_special in (
        (SEQUENCE_BOS, STRUCTURE_BOS),
        (SEQUENCE_PAD, STRUCTURE_PAD),
        (SEQUENCE_EOS, STRUCTURE_EOS),
        (SEQUENCE_CHAINBREAK, STRUCTURE_CHAINBREAK),
    ):
        struct = np.where(out["sequence_tokens"] == seq_special, struct_special, struct)
    out["structure_tokens"] = struct.astype(np.int32)

    if ss8 is None:
        out["ss8_tokens"] = np.full(n2, SS8_PAD, dtype=np.int32)
    else:
        ss_ids = encode_ss8(ss8, add_special_tokens=False)
        _check_length("ss8", len(ss_ids), n)
        out["ss8_tokens"] = _frame(ss_ids, SS8_PAD, SS8_PAD)

    if sasa is None:
        out["sasa_tokens"] = np.full(n2, SASA_PAD, dtype=np.int32)
    else:
        sasa_ids = sasa_to_tokens(sasa, add_special_tokens=False)
        _check_length("sasa", len(sasa_ids), n)
        out["sasa_tokens"] = _frame(sasa_ids, SASA_PAD, SASA_PAD)

    if function_tokens is None:
        out["function_tokens"] = np.full((n2, FUNCTION_DEPTH), FUNCTION_PAD, dtype=np.int32)
    else:
        fn = validate_function_tokens(function_tokens, track="function_tokens")
        _check_length("function_tokens", fn.shape[0], n)
        out["function_tokens"] = _frame(fn, FUNCTION_PAD, FUNCTION_PAD)

    if residue_annotations is not None:
        _check_length("residue_annotations", len(residue_annotations), n)
    out["residue_annotation_tokens"] = encode_residue_annotations(residue_annotations, n)

    if coords is None:
        xyz = np.full((n, 3, 3), np.nan, dtype=np.float32)
        has_coords = np.zeros(n, dtype=bool)
    else:
        xyz = np.asarray(coords, dtype=np.float32)
        if xyz.ndim != 3 or xyz.shape[1] < 3 or xyz.shape[2] != 3:
            raise TokenError(f"coords: expected shape (length, atoms >= 3, 3), got {xyz.shape}")
        _check_length("coords", xyz.shape[0], n)
        has_coords = np.isfinite(xyz).all(axis=-1).any(axis=-1)
        xyz = np.where(np.isfinite(xyz[:, :3]), xyz[:, :3], np.nan)
    out["structure_coords"] = _frame(xyz, np.nan, np.nan)

    if plddt is None:
        average = 1.0
        per_res = has_coords.astype(np.float32)
    else:
        per_res = np.asarray(plddt, dtype=np.float32)
        if per_res.ndim != 1:
            raise TokenError(f"plddt: expected one value per residue, got shape {per_res.shape}")
        _check_length("plddt", per_res.shape[0], n)
        bad = np.flatnonzero(~((per_res >= 0) & (per_res <= 1)))
        if bad.size:
            raise TokenError(
                f"plddt: value {float(per_res[bad[0]])} at position {bad[0] + 1} is outside [0, 1] "
                "(divide 0-100 pLDDT by 100)"
            )
        average = float(per_res.mean()) if n else 1.0
    out["average_plddt"] = np.full(n2, average, dtype=np.float32)
    out["per_res_plddt"] = _frame(per_res.astype(np.float32), 0.0, 0.0)

    out["chain_id"] = np.zeros(n2, dtype=np.int32)
    out["sequence_id"] = np.zeros(n2, dtype=np.int32)
    return out
