"""A protein structure in memory: one chain (atom37 coordinates, sequence, residue numbers,
B-factors) or several joined with chain breaks, as frozen records of read-only numpy arrays;
and the error that names the file and chain a structure came from. io.py reads and writes them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from esm3_jax.structure import residue_constants as rc

# Beyond any real assembly (the largest cryo-EM maps span a few thousand Å) and beyond what the
# PDB format can even write (8.3f columns): such values are corrupt, not far away.
MAX_ABS_COORDINATE = 1e4
CHAIN_BREAK = "|"  # the sequence vocabulary's chain-break token (tokens.SEQUENCE_CHAINBREAK)


class StructureError(ValueError):
    """A structure file or chain that cannot be used; `reason` is a short key for counting."""

    NOT_A_STRUCTURE = "not_a_structure"
    CHAIN_NOT_FOUND = "chain_not_found"
    NO_PROTEIN = "no_protein"  # the file (or the named chain) holds no protein polymer
    EMPTY_CHAIN = "empty_chain"
    NO_BACKBONE = "no_complete_backbone"
    BAD_COORDINATES = "bad_coordinates"
    TOO_LONG = "too_long"

    def __init__(self, message: str, *, path: str | Path, reason: str, chain: str | None = None):
        where = f"{path}" if chain is None else f"{path} chain {chain!r}"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.chain = chain
        self.reason = reason


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a)  # own the memory so nobody else can write through a view
    a.flags.writeable = False
    return a


@dataclasses.dataclass(frozen=True, eq=False)
class ProteinChain:
    """One protein chain in atom37 layout (residue_constants.ATOM37_NAMES).

    sequence        str of length L, one letter per residue (parents for modified residues, X
                    for unknown ones)
    coords          (L, 37, 3) float32, Å; NaN where the atom is absent
    residue_index   (L,) int32, author residue numbers
    insertion_code  (L,) str, '' when none
    b_factor        (L,) float32, the CA's B-factor (pLDDT for predicted structures)
    residue_name    (L,) str, the residue names as written in the file (MSE, ACE, ...)
    chain_id        author chain id ('' is legal in old PDB files)
    source          where the chain came from, for messages ('' when built in memory)
    """

    sequence: str
    coords: np.ndarray
    residue_index: np.ndarray
    insertion_code: np.ndarray
    b_factor: np.ndarray
    residue_name: np.ndarray
    chain_id: str
    source: str = ""

    def __post_init__(self):
        n = len(self.sequence)
        fields = dict(
            coords=np.asarray(self.coords, np.float32),
            residue_index=np.asarray(self.residue_index, np.int32),
            insertion_code=np.asarray(self.insertion_code, np.str_),
            b_factor=np.asarray(self.b_factor, np.float32),
            residue_name=np.asarray(self.residue_name, np.str_),
        )
        if fields["coords"].shape != (n, rc.NUM_ATOM37, 3):
            raise ValueError(f"coords must be ({n}, 37, 3) for a length-{n} sequence, got {fields['coords'].shape}")
        for name, value in fields.items():
            if name != "coords" and value.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {value.shape}")
        for name, value in fields.items():
            object.__setattr__(self, name, _readonly(value))

    @classmethod
    def from_coords(
        cls,
        sequence: str,
        coords: np.ndarray,
        *,
        chain_id: str = "A",
        residue_index: np.ndarray | None = None,
        b_factor: np.ndarray | None = None,
    ) -> ProteinChain:
        """A chain from atom37 (L, 37, 3) or backbone (L, 3, 3) N/CA/C coordinates, e.g. a model output."""
        coords = np.asarray(coords, np.float32)
        n = len(sequence)
        if coords.shape == (n, 3, 3):
            full = np.full((n, rc.NUM_ATOM37, 3), np.nan, np.float32)
            full[:, :3] = coords
            coords = full
        names = [rc.RESTYPE_1TO3.get(aa, rc.UNKNOWN_RESIDUE_NAME) for aa in sequence]
        return cls(
            sequence=sequence,
            coords=coords,
            residue_index=np.arange(1, n + 1) if residue_index is None else residue_index,
            insertion_code=np.full(n, ""),
            b_factor=np.zeros(n) if b_factor is None else b_factor,
            residue_name=np.asarray(names, np.str_),
            chain_id=chain_id,
        )

    def __len__(self) -> int:
        return len(self.sequence)

    @functools.cached_property
    def atom_mask(self) -> np.ndarray:
        """(L, 37) bool: the atom is present."""
        return _readonly(np.isfinite(self.coords).all(-1))

    @property
    def backbone(self) -> np.ndarray:
        """(L, 3, 3) N, CA, C coordinates: the structure input the model reads."""
        return self.coords[:, :3]

    @functools.cached_property
    def backbone_mask(self) -> np.ndarray:
        """(L,) bool: N, CA and C are all present."""
        return _readonly(self.atom_mask[:, :3].all(-1))

    @property
    def n_backbone(self) -> int:
        return int(self.backbone_mask.sum())

    @property
    def name(self) -> str:
        """'source:chain_id', for messages."""
        return f"{self.source}:{self.chain_id}"

    @property
    def n_unknown(self) -> int:
        """Residues whose name has no amino-acid parent (written as X)."""
        return self.sequence.count(rc.UNKNOWN_RESIDUE)


@dataclasses.dataclass(frozen=True, eq=False)
class ProteinComplex:
    """Several chains as one record: the joined arrays put one chain-break position between chains.

    The break position carries `|` in the sequence, NaN coordinates, residue_index -1,
    chain_index -1 and NaN b_factor (the reference's ProteinComplex uses the same -1 fill).
    """

    chains: tuple[ProteinChain, ...]

    def __post_init__(self):
        object.__setattr__(self, "chains", tuple(self.chains))
        if not self.chains:
            raise ValueError("a ProteinComplex needs at least one chain")

    def _join(self, arrays: Sequence[np.ndarray], fill) -> np.ndarray:
        sep = np.full((1, *arrays[0].shape[1:]), fill, dtype=arrays[0].dtype)
        parts = [arrays[0]]
        for a in arrays[1:]:
            parts += [sep, a]
        return _readonly(np.concatenate(parts))

    @property
    def sequence(self) -> str:
        return CHAIN_BREAK.join(c.sequence for c in self.chains)

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def chain_ids(self) -> tuple[str, ...]:
        return tuple(c.chain_id for c in self.chains)

    @functools.cached_property
    def coords(self) -> np.ndarray:
        """(L, 37, 3), NaN rows at chain breaks."""
        return self._join([c.coords for c in self.chains], np.nan)

    @functools.cached_property
    def atom_mask(self) -> np.ndarray:
        return _readonly(np.isfinite(self.coords).all(-1))

    @functools.cached_property
    def chain_index(self) -> np.ndarray:
        """(L,) int32: position of the residue's chain in `chains`; -1 at chain breaks."""
        return self._join([np.full(len(c), i, np.int32) for i, c in enumerate(self.chains)], -1)

    @functools.cached_property
    def residue_index(self) -> np.ndarray:
        return self._join([c.residue_index for c in self.chains], -1)

    @functools.cached_property
    def b_factor(self) -> np.ndarray:
        return self._join([c.b_factor for c in self.chains], np.nan)


def join_chains(chains: Iterable[ProteinChain]) -> ProteinComplex:
    """One complex record from chains, with a chain-break token between consecutive chains."""
    return ProteinComplex(tuple(chains))
