"""Atom and residue naming shared by the structure code: the atom37 layout and residue codes.

atom37 is the fixed 37-slot heavy-atom layout used by AlphaFold and by the ESM3 release: every
residue type puts each of its atoms in the slot of that atom's PDB name, so one (L, 37, 3) array
holds any protein. The first three slots are N, CA, C, which is why `coords[:, :3]` is the
backbone that ESM3's geometric attention and structure tokenizer read (ESM3_SPEC 1.9).
"""

from __future__ import annotations

ATOM37_NAMES: tuple[str, ...] = (
    "N", "CA", "C", "CB", "O", "CG", "CG1", "CG2", "OG", "OG1", "SG", "CD", "CD1", "CD2",
    "ND1", "ND2", "OD1", "OD2", "SD", "CE", "CE1", "CE2", "CE3", "NE", "NE1", "NE2", "OE1",
    "OE2", "CH2", "NH1", "NH2", "OH", "CZ", "CZ2", "CZ3", "NZ", "OXT",
)  # fmt: skip
ATOM37_INDEX: dict[str, int] = {name: i for i, name in enumerate(ATOM37_NAMES)}
NUM_ATOM37 = len(ATOM37_NAMES)
N_IDX, CA_IDX, C_IDX, O_IDX = (ATOM37_INDEX[a] for a in ("N", "CA", "C", "O"))
BACKBONE_ATOMS = ("N", "CA", "C")

# Element of each atom37 slot: its first letter (C, N, O or S) in every case.
ATOM37_ELEMENTS: tuple[str, ...] = tuple(name[0] for name in ATOM37_NAMES)

# The 20 canonical residues plus the extras the ESM3 sequence vocabulary also carries: the
# genetically encoded U (selenocysteine) and O (pyrrolysine), and the crystallographers'
# ambiguity codes B (Asp or Asn) and Z (Glu or Gln).
RESTYPE_1TO3: dict[str, str] = {
    "A": "ALA", "R": "ARG", "N": "ASN", "D": "ASP", "C": "CYS", "Q": "GLN", "E": "GLU",
    "G": "GLY", "H": "HIS", "I": "ILE", "L": "LEU", "K": "LYS", "M": "MET", "F": "PHE",
    "P": "PRO", "S": "SER", "T": "THR", "W": "TRP", "Y": "TYR", "V": "VAL",
    "U": "SEC", "O": "PYL", "B": "ASX", "Z": "GLX",
}  # fmt: skip
RESTYPE_3TO1: dict[str, str] = {three: one for one, three in RESTYPE_1TO3.items()}
UNKNOWN_RESIDUE = "X"
UNKNOWN_RESIDUE_NAME = "UNK"

# Modified residues whose atoms keep a different name in the parent's slot. Selenomethionine
# (MSE) is by far the most common modified residue in the PDB (it is how most crystal
# structures get phased): its selenium sits where methionine's sulphur is.
MODIFIED_ATOM_RENAMES: dict[tuple[str, str], str] = {("MSE", "SE"): "SD"}
