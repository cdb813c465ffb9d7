"""Per-residue structure features for ESM3's SS8 and SASA tracks (ESM3_SPEC 1.3, 1.4).

SS8 comes from DSSP as the paper's data pipeline does: the Debian `dssp` package's `mkdssp`
(4.x) run on an mmCIF file written by gemmi. mkdssp's letters map onto the 8-state alphabet
GHITEBSC: H, B, E, G, I, T, S stay; P (DSSP 4's polyproline II, absent from the classic
8 states) and blank (loop) become C. A residue DSSP cannot assign (it lacks one of N, CA, C, O)
gets SS8_UNASSIGNED, which `tokens.encode_ss8` reads as "no label" (id 0).

SASA is Shrake-Rupley through biotite (`biotite.structure.sasa`): biotite is already a
dependency, it is what the reference ESM3 code computes SASA with, and its ProtOr radii
(heavy atoms with implicit hydrogens) fit crystal structures without hydrogens. freesasa serves
only as an independent cross-check in the tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import biotite.structure as bs
import biotite.structure.info as ccd
import numpy as np

from esm3_jax import tokens
from esm3_jax.structure import residue_constants as rc
from esm3_jax.structure.chain import ProteinChain
from esm3_jax.structure.io import to_mmcif_string

MKDSSP_ENV = "ESM3_JAX_MKDSSP"  # overrides where mkdssp is looked for
SS8_UNASSIGNED = tokens.MASK_CHAR
# mkdssp letter -> SS8 letter; anything not listed (P, blank) is coil.
_DSSP_TO_SS8 = {c: c for c in "HBEGITS"}
_CHAIN_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
# DSSP reads hydrogen bonds from these atoms only; the side chains do not change its answer.
_DSSP_ATOMS = [rc.ATOM37_INDEX[a] for a in ("N", "CA", "C", "O")]


class DsspNotFoundError(FileNotFoundError):
    pass


class DsspError(RuntimeError):
    pass


def find_mkdssp(mkdssp: str | os.PathLike | None = None) -> str:
    """Path of the mkdssp executable: the argument, else $ESM3_JAX_MKDSSP, else `mkdssp` on PATH."""
    wanted = str(mkdssp or os.environ.get(MKDSSP_ENV) or "mkdssp")
    found = shutil.which(wanted)
    if found is None:
        raise DsspNotFoundError(
            f"mkdssp not found (looked for {wanted!r}); install it with `apt-get install dssp` "
            f"(Debian/Ubuntu, gives mkdssp 4.x), or pass its path / set {MKDSSP_ENV}"
        )
    return found


def _parse_classic_dssp(text: str) -> dict[tuple[str, int], str]:
    """(chain letter, residue number) -> DSSP letter, from mkdssp's classic output."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("  #  RESIDUE"))
    except StopIteration:
        raise DsspError("mkdssp output has no residue table") from None
    assigned = {}
    for line in lines[start + 1 :]:
        if len(line) < 17 or line[13] == "!":  # '!' lines mark chain breaks
            continue
        assigned[(line[11], int(line[5:10]))] = line[16]
    return assigned


def dssp_ss8_chains(
    chains: Sequence[ProteinChain], *, mkdssp: str | os.PathLike | None = None, timeout: float = 300.0
) -> list[str]:
    """SS8 strings (GHITEBSC, SS8_UNASSIGNED where DSSP gives none) for chains assessed together.

    Chains passed together are one assembly to DSSP, so strands paired across chains (amyloid
    stacks, dimer interfaces) count as sheet; pass one chain for single-chain labels.
    """
    exe = find_mkdssp(mkdssp)
    if len(chains) > len(_CHAIN_LETTERS):
        raise ValueError(f"DSSP's classic format has {len(_CHAIN_LETTERS)} chain letters; got {len(chains)} chains")
    # A copy with only the atoms DSSP reads, one-letter chain names and residues numbered 1..L, so
    # that mapping its fixed-column output back is unambiguous (insertion codes, long chain ids).
    # DSSP finds chain breaks from the C-N distance, not from numbering.
    renamed = []
    for letter, chain in zip(_CHAIN_LETTERS, chains):
        coords = np.full_like(chain.coords, np.nan)
        coords[:, _DSSP_ATOMS] = chain.coords[:, _DSSP_ATOMS]
        renamed.append(
            ProteinChain(
                sequence=chain.sequence,
                coords=coords,
                residue_index=np.arange(1, len(chain) + 1),
                insertion_code=np.full(len(chain), ""),
                b_factor=np.zeros(len(chain)),
                residue_name=chain.residue_name,
                chain_id=letter,
            )
        )
    with tempfile.TemporaryDirectory(prefix="esm3_jax_dssp_") as tmp:
        cif, out = Path(tmp) / "in.cif", Path(tmp) / "out.dssp"
        # Parent residue names: mkdssp looks every residue up in its own dictionary.
        cif.write_text(to_mmcif_string(renamed, canonical_names=True))
        run = subprocess.run(
            [exe, "--output-format", "dssp", str(cif), str(out)], capture_output=True, text=True, timeout=timeout
        )
        if run.returncode != 0 or not out.exists():
            raise DsspError(f"mkdssp failed (exit {run.returncode}): {run.stderr.strip()[-500:]}")
        assigned = _parse_classic_dssp(out.read_text())
    result = []
    for letter, chain in zip(_CHAIN_LETTERS, chains):
        result.append(
            "".join(
                _DSSP_TO_SS8.get(assigned[(letter, i + 1)], "C") if (letter, i + 1) in assigned else SS8_UNASSIGNED
                for i in range(len(chain))
            )
        )
    if any(chain.atom_mask[:, _DSSP_ATOMS].all(-1).any() for chain in chains) and not assigned:
        raise DsspError("mkdssp assigned no residue although some have a full N, CA, C, O backbone")
    return result


def dssp_ss8(chain: ProteinChain, *, mkdssp: str | os.PathLike | None = None) -> str:
    """SS8 string of one chain, from mkdssp run on that chain alone."""
    return dssp_ss8_chains([chain], mkdssp=mkdssp)[0]


def _atom_radius(res_name: str, atom_name: str) -> float:
    try:
        radius = ccd.vdw_radius_protor(res_name, atom_name)
    except KeyError:  # the atom is not in the parent residue (e.g. HYP's OD1 on PRO)
        radius = None
    return radius if radius is not None else ccd.vdw_radius_single(atom_name[0])


def _chain_atom_array(chain: ProteinChain) -> bs.AtomArray:
    """biotite AtomArray of the chain's present atoms; res_id is the residue's position (0..L-1)."""
    res_i, slot_i = np.nonzero(chain.atom_mask)
    names = np.asarray(rc.ATOM37_NAMES)[slot_i]
    res_names = np.asarray([rc.RESTYPE_1TO3.get(aa, rc.UNKNOWN_RESIDUE_NAME) for aa in chain.sequence])[res_i]
    atoms = bs.AtomArray(len(res_i))
    atoms.coord = chain.coords[res_i, slot_i]
    atoms.res_id = res_i
    atoms.res_name = res_names
    atoms.atom_name = names
    atoms.element = np.asarray(rc.ATOM37_ELEMENTS)[slot_i]
    atoms.chain_id = np.full(len(res_i), chain.chain_id or "A")
    return atoms


def sasa(chain: ProteinChain, *, probe_radius: float = 1.4, point_number: int = 1000) -> np.ndarray:
    """(L,) float32 solvent-accessible surface area per residue in Å² (Shrake-Rupley, ProtOr radii).

    Computed on the chain alone from its atom37 heavy atoms. NaN for a residue with no atoms.
    """
    atoms = _chain_atom_array(chain)
    radii = np.array([_atom_radius(r, a) for r, a in zip(atoms.res_name, atoms.atom_name)], np.float32)
    per_atom = bs.sasa(atoms, probe_radius=probe_radius, point_number=point_number, vdw_radii=radii)
    per_residue = np.bincount(atoms.res_id, weights=per_atom, minlength=len(chain))
    return np.where(chain.atom_mask.any(-1), per_residue, np.nan).astype(np.float32)


def sasa_tokens(sasa_L: np.ndarray, add_special_tokens: bool = False) -> np.ndarray:
    """SASA values into the spec's 16 bins as track ids 3..18 (NaN -> <unk>), via tokens.sasa_to_tokens."""
    return tokens.sasa_to_tokens(np.asarray(sasa_L, np.float32), add_special_tokens=add_special_tokens)
