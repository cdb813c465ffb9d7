"""Ideal residue geometry for building heavy atoms from backbone frames and torsion angles.

Each residue is a tree of rigid groups, as in AlphaFold 2 (Jumper et al. 2021, supplementary
1.8.1): the backbone group (N, CA, C, CB), the psi group (O), and one group per side-chain chi
angle. A group's atoms sit at fixed positions in its own frame; a torsion angle turns a group
about its x-axis relative to its parent group. The ideal positions below are AlphaFold 2's
published constants (Engh & Huber bond lengths and angles, fitted per residue type); the tables
derived from them are numpy arrays indexed by residue type in the order of `AMINO_ACIDS` (the
VQ-VAE's amino-acid indices), with one extra row for unknown residues, which are built as a
bare glycine backbone (N, CA, C, O).

Frames follow AlphaFold's convention: in the backbone frame CA is the origin, C lies on +x and N
in the xy-plane with y > 0 (ESM3's frames put C on -x, ESM3_SPEC 3.1; all_atom.py converts). In
a chi group's frame the x-axis runs along the rotation axis (CA -> CB for chi1), the origin is
the axis' end atom, and at torsion 0 the atom before the axis (N for chi1) lies in the xy-plane
with y > 0, so each chi angle equals the dihedral of its four path atoms. The psi group turns O
about CA -> C with N on -y, so its angle is the N-CA-C-O dihedral + pi (the usual psi, which is
measured to the next residue's N, for a planar peptide).

atom14 is the compact per-residue layout (AlphaFold's order): N, CA, C, O, then the side chain.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from esm3_jax.structure import residue_constants as rc

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"  # the VQ-VAE's amino-acid indices (model.vqvae); 20 = unknown
N_RESTYPES = len(AMINO_ACIDS) + 1
UNKNOWN_RESTYPE = len(AMINO_ACIDS)
NUM_ATOM14 = 14
GROUPS = ("backbone", "psi", "chi1", "chi2", "chi3", "chi4")
N_GROUPS = len(GROUPS)
# The 7 predicted torsions, in the order of the decoder's (sin, cos) pairs. omega and phi move no
# heavy atom (in AlphaFold they turn hydrogens only) but are still supervised.
TORSIONS = ("omega", "phi", "psi", "chi1", "chi2", "chi3", "chi4")
N_TORSIONS = len(TORSIONS)
PSI_TORSION, FIRST_CHI_TORSION = 2, 3
# Side chains that look the same after a half-turn of one chi: that angle is defined only up to
# pi (AlphaFold's chi_pi_periodic), and the named atom pairs swap under the half-turn.
PI_PERIODIC_CHI = {"ASP": 2, "GLU": 3, "PHE": 2, "TYR": 2}
SYMMETRIC_ATOM_SWAPS = {
    "ASP": (("OD1", "OD2"),),
    "GLU": (("OE1", "OE2"),),
    "PHE": (("CD1", "CD2"), ("CE1", "CE2")),
    "TYR": (("CD1", "CD2"), ("CE1", "CE2")),
}
# The longest heavy-atom bond (C-S, 1.81 Å) is well below the shortest non-bonded distance
# within a residue (1-3 pairs, >= 2.2 Å): this threshold separates the two.
_MAX_BOND = 2.0

# Per residue: a header with its chi path (chi k is the dihedral of path atoms k..k+3; '-' for
# none), then its heavy atoms in atom14 order: name, rigid group, position (Å) in that group's
# frame.
_IDEAL_RESIDUES = """
ALA  -
  N   bb     -0.525   1.363   0.000
  CA  bb      0.000   0.000   0.000
  C   bb      1.526   0.000   0.000
  O   psi     0.627   1.062   0.000
  CB  bb     -0.529  -0.774  -1.205
ARG  N CA CB CG CD NE CZ
  N   bb     -0.524   1.362   0.000
  CA  bb      0.000   0.000   0.000
  C   bb      1.525   0.000   0.000
  O   psi     0.626   1.062   0.000
  CB  bb     -0.524  -0.778  -1.209
  CG  chi1    0.616   1.390   0.000
  CD  chi2    0.564   1.414   0.000
  NE  chi3    0.539   1.357   0.000
  CZ  chi4    0.758   1.093   0.000
  NH1 chi4    0.206   2.301   0.000
  NH2 chi4    2.078   0.978   0.000
ASN  N CA CB CG OD1
  N   bb     -0.536   1.357   0.000
  CA  bb      0.000   0.000   0.000
  C   bb      1.526   0.000   0.000
  O   psi     0.625   1.062   0.000
  CB  bb     -0.531  -0.787  -1.200
  CG  chi1    0.584   1.399   0.000
  OD1 chi2    0.633   1.059   0.000
  ND2 chi2    0.593  -1.188   0.001
ASP  N CA CB CG OD1
  N   bb     -0.525   1.362   0.000
  CA  bb      0.000   0.000   0.000
  C   bb      1.527   0.000   0.000
  O   psi     0.626   1.062   0.000
  CB  bb     -0.526  -0.778  -1.208
  CG  chi1    0.593   1.398   0.000
  OD1 chi2    0.610   1.091   0.000
  OD2 chi2    0.592  -1.101  -0.003
CYS  N CA CB SG
  N   bb     -0.522   1.362   0.000
  CA  bb      0.000   0.000   0.000
  C   bb      1.524   0.000   0.000
  O   psi     0.625   1.062   0.000
  CB  bb     -0.519  -0.773  -1.212
  SG  chi1    0.728   1.653   0.000
GLN  N CA CB CG CD OE1
  N   bb     -0.526   1.361   0.000
  CA  bb      0.000   0.000   0.000
  C   bb      1.526   0.000   0.000
  O   psi     0.626   1.062   0.000
  CB  bb     -0.525  -0.779  -1.207
  CG  chi1    0.615   1.393   0.000
  CD  chi2    0.587   1.399   0.000
  OE1 chi3    0.634   1.060   0.000
  NE2 chi3    0.593  -1.189  -0.001
GLU  N CA CB CG CD OE1
  N   bb     -0.528   1.361   0.000
  CA  bb      0.000   0.000   0.000
  C   bb      1.526   0.000   0.000
  O   psi     0.626   1.062   0.000
  CB  bb     -0.526  -0.781  -1.207
  CG  chi1    0.615   1.392   0.000
  CD  chi2    0.600   1.397   0.000
  OE1 chi3    0.607   1.095   0.000
  OE2 chi3    0.589  -1.104  -0.001
GLY  -
  N   bb     -0.572   1.337   0.000
  CA  bb      0.000   0.000   0.000
  C   bb      1.517   0.000   0.000
  O   psi     0.626   1.062   0.000
HIS  N CA CB CG ND1
  N   bb     -0.527   1.360   0.000
  CA  bb      0.000   0.000   0.000
  C   bb      1.525   0.000   0.000
  O   psi     0.625   1.063   0.000
  CB  bb     -0.525  -0.778  -1.208
  CG  chi1    0.600   1.370   0.000
  ND1 chi2    0.744   1.160   0.000
  CD2 chi2    0.889  -1.021   0.003
  CE1 chi2    2.030   0.851   0.002
  NE2 chi2    2.145  -0.466   0.004
ILE  N CA CB CG1 CD1
  N   bb     -0.493   1.373   0.000
  CA  bb      0.000   0.000   0.000
  C   bb      1.527   0.000   0.000
  O   psi     0.627   1.062   0.000
  CB  bb     -0.536  -0.793  -1.213
  CG1 chi1    0.534   1.437   0.000
  CG2 chi1    0.540  -0.785  -1.199
  CD1 chi2    0.619   1.391   0.000
LEU  N CA CB CG CD1
  N   bb     -0.520   1.363   0.000
  CA  bb      0.000   0.000   0.000
  C   bb      1.525   0.000   0.000
  O   psi     0.625   1.063   0.000
  CB  bb     -0.522  -0.773  -1.214
  CG  chi1    0.678   1.371   0.000
  CD1 chi2    0.530   1.430   0.000
  CD2 chi2    0.535  -0.774   1.200
LYS  N CA CB CG CD CE NZ
  N   bb     -0.526   1.362   0.000
  CA  bb      0.000   0.000   0.000
  C   bb      1.526   0.000   0.000
  O   psi     0.626   1.062   0.000
  CB  bb     -0.524  -0.778  -1.208
  CG  chi1    0.619   1.390   0.000
  CD  chi2    0.559   1.417   0.000
  CE  chi3    0.560   1.416   0.000
  NZ  chi4    0.554   1.387   0.000
MET  N CA CB CG SD CE
  N   bb     -0.521   1.364   0.000
  CA  bb      0.000   0.000   0.000
  C   bb      1.525   0.000   0.000
  O   psi     0.625   1.062   0.000
  CB  bb     -0.523  -0.776  -1.210
  CG  chi1    0.613   1.391   0.000
  SD  chi2    0.703   1.695   0.000
  CE  chi3    0.320   1.786   0.000
PHE  N CA CB CG CD1
  N   bb     -0.518   1.363   0.000
  CA  bb      0.000   0.000   0.000
  C   bb      1.524   0.000   0.000
  O   psi     0.626   1.062   0.000
  CB  bb     -0.525  -0.776  -1.212
  CG  chi1    0.607   1.377   0.000
  CD1 chi2    0.709   1.195   0.000
  CD2 chi2    0.706  -1.196   0.000
  CE1 chi2    2.102   1.198   0.000
  CE2 chi2    2.098  -1.201   0.000
  CZ  chi2    2.794  -0.003  -0.001
PRO  N CA CB CG CD
  N   bb     -0.566   1.351   0.000
  CA  bb      0.000   0.000   0.000
  C   bb      1.527   0.000   0.000
  O   psi     0.621   1.066   0.000
  CB  bb     -0.546  -0.611  -1.293
  CG  chi1    0.382   1.445   0.000
  CD  chi2    0.477   1.424   0.000
SER  N CA CB OG
  N   bb     -0.529   1.360   0.000
  CA  bb      0.000   0.000   0.000
  C   bb      1.525   0.000   0.000
  O   psi     0.626   1.062   0.000
  CB  bb     -0.518  -0.777  -1.211
  OG  chi1    0.503   1.325   0.000
THR  N CA CB OG1
  N   bb     -0.517   1.364   0.000
  CA  bb      0.000   0.000   0.000
  C   bb      1.526   0.000   0.000
  O   psi     0.626   1.062   0.000
  CB  bb     -0.516  -0.793  -1.215
  OG1 chi1    0.472   1.353   0.000
  CG2 chi1    0.550  -0.718  -1.228
TRP  N CA CB CG CD1
  N   bb     -0.521   1.363   0.000
  CA  bb      0.000   0.000   0.000
  C   bb      1.525   0.000   0.000
  O   psi     0.627   1.062   0.000
  CB  bb     -0.523  -0.776  -1.212
  CG  chi1    0.609   1.370   0.000
  CD1 chi2    0.824   1.091   0.000
  CD2 chi2    0.854  -1.148  -0.005
  NE1 chi2    2.140   0.690  -0.004
  CE2 chi2    2.186  -0.678  -0.007
  CE3 chi2    0.622  -2.530  -0.007
  CZ2 chi2    3.283  -1.543  -0.011
  CZ3 chi2    1.715  -3.389  -0.011
  CH2 chi2    3.028  -2.890  -0.013
TYR  N CA CB CG CD1
  N   bb     -0.522   1.362   0.000
  CA  bb      0.000   0.000   0.000
  C   bb      1.524   0.000   0.000
  O   psi     0.627   1.062   0.000
  CB  bb     -0.522  -0.776  -1.213
  CG  chi1    0.607   1.382   0.000
  CD1 chi2    0.716   1.195   0.000
  CD2 chi2    0.713  -1.194  -0.001
  CE1 chi2    2.107   1.200  -0.002
  CE2 chi2    2.104  -1.201  -0.003
  CZ  chi2    2.791  -0.001  -0.003
  OH  chi2    4.168  -0.002  -0.005
VAL  N CA CB CG1
  N   bb     -0.494   1.373   0.000
  CA  bb      0.000   0.000   0.000
  C   bb      1.527   0.000   0.000
  O   psi     0.627   1.062   0.000
  CB  bb     -0.533  -0.795  -1.213
  CG1 chi1    0.540   1.429   0.000
  CG2 chi1    0.533  -0.776   1.203
"""

@dataclasses.dataclass(frozen=True)
class IdealResidue:
    name: str  # three-letter code
    chi_path: tuple[str, ...]  # chi k (1-based) is the dihedral of chi_path[k-1 : k+3]
    atoms: tuple[str, ...]  # atom14 order
    groups: tuple[int, ...]  # index into GROUPS, per atom
    positions: np.ndarray  # (n_atoms, 3) in the group's frame

    @property
    def n_chi(self) -> int:
        return max(len(self.chi_path) - 3, 0)


def _parse(text: str) -> dict[str, IdealResidue]:
    group_of = {"bb": 0, "psi": 1, "chi1": 2, "chi2": 3, "chi3": 4, "chi4": 5}
    out: dict[str, IdealResidue] = {}
    blocks = [b for b in text.strip().split("\n") if b.strip()]
    current: list = []
    for line in blocks + ["END -"]:
        if not line.startswith(" "):
            if current:
                name, path, rows = current[0], current[1], current[2:]
                out[name] = IdealResidue(
                    name, path, tuple(r[0] for r in rows), tuple(group_of[r[1]] for r in rows),
                    np.array([[float(v) for v in r[2:]] for r in rows], np.float64),
                )
            name, *path = line.split()
            current = [name, () if path == ["-"] else tuple(path)]
        else:
            current.append(line.split())
    return out


IDEAL_RESIDUES: dict[str, IdealResidue] = _parse(_IDEAL_RESIDUES)
RESTYPE_NAMES: tuple[str, ...] = tuple(rc.RESTYPE_1TO3[a] for a in AMINO_ACIDS) + (rc.UNKNOWN_RESIDUE_NAME,)
# Unknown residues: glycine's backbone, no side chain.
_UNKNOWN = dataclasses.replace(IDEAL_RESIDUES["GLY"], name=rc.UNKNOWN_RESIDUE_NAME)


def _ideal(restype: int) -> IdealResidue:
    return IDEAL_RESIDUES[RESTYPE_NAMES[restype]] if restype < UNKNOWN_RESTYPE else _UNKNOWN


def _frame(x_axis: np.ndarray, xy_plane: np.ndarray, origin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rotation with columns e1 || x_axis, e2 in the (x_axis, xy_plane) plane, e3; origin)."""
    e1 = x_axis / np.linalg.norm(x_axis)
    u = xy_plane - e1 * (e1 @ xy_plane)
    e2 = u / np.linalg.norm(u)
    return np.stack([e1, e2, np.cross(e1, e2)], axis=-1), origin


def _default_frames(res: IdealResidue) -> tuple[np.ndarray, np.ndarray]:
    """Each group's frame in its parent's frame at torsion 0: (N_GROUPS, 3, 3), (N_GROUPS, 3).

    Parents: psi and chi1 hang on the backbone, chi k on chi k-1; a chi the residue lacks stays
    the identity (it carries no atom).
    """
    rot = np.tile(np.eye(3), (N_GROUPS, 1, 1))
    trans = np.zeros((N_GROUPS, 3))
    pos = {a: p for a, p in zip(res.atoms, res.positions)}
    # psi turns about CA -> C; N ends up on -y, so the psi angle is the N-CA-C-O dihedral + pi.
    rot[1], trans[1] = _frame(pos["C"] - pos["CA"], pos["CA"] - pos["N"], pos["C"])
    if res.n_chi:
        a, b, c = (pos[x] for x in res.chi_path[:3])  # N, CA, CB
        rot[2], trans[2] = _frame(c - b, a - b, c)
    for k in range(1, res.n_chi):
        # The axis' end atom is given in the previous chi's frame, whose origin is the axis'
        # start and whose x-axis points away from the atom before it, hence the -x.
        end = pos[res.chi_path[k + 2]]
        rot[2 + k], trans[2 + k] = _frame(end, np.array([-1.0, 0.0, 0.0]), end)
    return rot, trans


def _parent_group(g: int) -> int:
    return 0 if g <= 2 else g - 1


def ideal_atoms_extended(res: IdealResidue) -> np.ndarray:
    """(n_atoms, 3) positions in the backbone frame with every chi at 180° (an extended side
    chain, free of the clashes an all-cis one has) and psi at 0."""
    rot, trans = _default_frames(res)
    half_turn = np.diag([1.0, -1.0, -1.0])  # rotation by pi about x
    g_rot, g_trans = [np.eye(3)], [np.zeros(3)]
    for g in range(1, N_GROUPS):
        p = _parent_group(g)
        turn = half_turn if g >= 2 else np.eye(3)
        g_rot.append(g_rot[p] @ rot[g] @ turn)
        g_trans.append(g_rot[p] @ trans[g] + g_trans[p])
    return np.stack([g_rot[g] @ x + g_trans[g] for g, x in zip(res.groups, res.positions)])


def _tables() -> dict[str, np.ndarray]:
    t = {
        "atom14_mask": np.zeros((N_RESTYPES, NUM_ATOM14), bool),
        "atom14_to_atom37": np.zeros((N_RESTYPES, NUM_ATOM14), np.int32),
        "atom37_to_atom14": np.zeros((N_RESTYPES, rc.NUM_ATOM37), np.int32),
        "atom37_mask": np.zeros((N_RESTYPES, rc.NUM_ATOM37), bool),
        "atom14_group": np.zeros((N_RESTYPES, NUM_ATOM14), np.int32),
        "atom14_position": np.zeros((N_RESTYPES, NUM_ATOM14, 3), np.float32),
        "atom14_parent": np.zeros((N_RESTYPES, NUM_ATOM14), np.int32),
        "atom14_swap": np.tile(np.arange(NUM_ATOM14, dtype=np.int32), (N_RESTYPES, 1)),
        "default_rot": np.zeros((N_RESTYPES, N_GROUPS, 3, 3), np.float32),
        "default_trans": np.zeros((N_RESTYPES, N_GROUPS, 3), np.float32),
        "chi_mask": np.zeros((N_RESTYPES, 4), bool),
        "chi_atom37": np.zeros((N_RESTYPES, 4, 4), np.int32),
        "chi_pi_periodic": np.zeros((N_RESTYPES, 4), bool),
    }
    for r in range(N_RESTYPES):
        res = _ideal(r)
        n = len(res.atoms)
        slots = [rc.ATOM37_INDEX[a] for a in res.atoms]
        t["atom14_mask"][r, :n] = True
        t["atom14_to_atom37"][r, :n] = slots
        t["atom37_to_atom14"][r, slots] = np.arange(n)
        t["atom37_mask"][r, slots] = True
        t["atom14_group"][r, :n] = res.groups
        t["atom14_position"][r, :n] = res.positions
        t["default_rot"][r], t["default_trans"][r] = _default_frames(res)
        # Each atom's covalent parent: the nearest atom listed before it (atom14 lists a side
        # chain outwards from CA). N is the root; CA's parent is N, C's CA, O's C.
        xyz = ideal_atoms_extended(res)
        for i in range(1, n):
            d = np.linalg.norm(xyz[:i] - xyz[i], axis=-1)
            if d.min() > _MAX_BOND:
                raise AssertionError(f"{res.name} {res.atoms[i]}: no bonded atom before it")
            t["atom14_parent"][r, i] = int(np.argmin(d))
        t["chi_mask"][r, : res.n_chi] = True
        for k in range(res.n_chi):
            t["chi_atom37"][r, k] = [rc.ATOM37_INDEX[a] for a in res.chi_path[k : k + 4]]
        if res.name in PI_PERIODIC_CHI:
            t["chi_pi_periodic"][r, PI_PERIODIC_CHI[res.name] - 1] = True
        for a, b in SYMMETRIC_ATOM_SWAPS.get(res.name, ()):
            i, j = res.atoms.index(a), res.atoms.index(b)
            t["atom14_swap"][r, i], t["atom14_swap"][r, j] = j, i
    for v in t.values():
        v.flags.writeable = False
    return t


TABLES: dict[str, np.ndarray] = _tables()
# atom14 slots that hold a naming-ambiguous atom in some residue type (6..9: OD1/OD2, OE1/OE2,
# the ring's CD1/CD2/CE1/CE2).
AMBIGUOUS_SLOTS: tuple[int, ...] = tuple(
    int(s) for s in np.flatnonzero((TABLES["atom14_swap"] != np.arange(NUM_ATOM14)).any(0))
)
