"""Protein structure files (PDB / mmCIF, plain or gzipped) in and out, as per-chain records.

Reading goes through gemmi, which parses both formats, decompresses .gz itself and decides which
residues form each chain's polymer (so waters and ligands that share a chain id drop out). On top
of that this module applies the choices a training pipeline needs to be explicit about:

- first model only (NMR entries carry tens of models of the same chain);
- chains are named by author chain id (mmCIF auth_asym_id), residues by author numbering;
- alternate locations: per residue, the conformer (altloc) with the highest mean occupancy wins,
  ties going to the first listed; atoms outside every altloc are always kept;
- microheterogeneity (two residue types at one position): the residue with the highest mean
  occupancy wins;
- modified residues become their parent's one-letter code using the wwPDB Chemical Component
  Dictionary shipped with biotite (MSE -> M, SEP -> S, PCA -> Q, ...); a residue with no
  amino-acid parent (ACE caps, unknown names) becomes X and is counted, never an error;
- nucleic-acid chains and chains of only waters/ligands are not proteins and are skipped;
- only observed residues are kept (no SEQRES filling): gaps show in `residue_index`.

Records are chain.py's frozen dataclasses of numpy arrays with NaN for missing atoms. Writing goes
back through gemmi, PDB or mmCIF by suffix, with per-residue B-factors (pLDDT for predictions).
"""

from __future__ import annotations

import collections
import functools
import gzip
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import biotite.structure.info as ccd
import gemmi
import numpy as np

from esm3_jax.structure import residue_constants as rc
from esm3_jax.structure.chain import MAX_ABS_COORDINATE, ProteinChain, ProteinComplex, StructureError

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Reading


@functools.lru_cache(maxsize=None)
def _one_letter(residue_name: str) -> str:
    """The residue's (parent) amino acid per the Chemical Component Dictionary, else X."""
    if residue_name in rc.RESTYPE_3TO1:
        return rc.RESTYPE_3TO1[residue_name]
    link_type = ccd.link_type(residue_name)
    if link_type is None or "PEPTIDE" not in link_type.upper():
        return rc.UNKNOWN_RESIDUE  # caps (ACE, NH2), sugars, names the dictionary lacks
    letter = ccd.one_letter_code(residue_name)
    return letter if letter in rc.RESTYPE_1TO3 else rc.UNKNOWN_RESIDUE


def _read_gemmi(path: Path) -> gemmi.Structure:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such structure file")
    try:
        # Detect reads the content, so odd suffixes (.ent, .txt) work; .gz is handled by gemmi.
        st = gemmi.read_structure(str(path), format=gemmi.CoorFormat.Detect)
    except (RuntimeError, ValueError, OSError) as e:
        raise StructureError(
            f"not a readable PDB or mmCIF file ({e})", path=path, reason=StructureError.NOT_A_STRUCTURE
        ) from e
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise StructureError(
            "no atoms found; not a PDB or mmCIF structure", path=path, reason=StructureError.NOT_A_STRUCTURE
        )
    st.setup_entities()  # decides, per chain, which residues are the polymer
    return st


def _occupancy(res: gemmi.Residue) -> float:
    return float(np.mean([a.occ for a in res])) if len(res) else 0.0


def _drop_microheterogeneity(polymer: gemmi.ResidueSpan) -> list[gemmi.Residue]:
    """Keep one residue per (number, insertion code): the highest-occupancy one, first on ties."""
    kept: list[gemmi.Residue] = []
    for res in polymer:
        if kept and kept[-1].seqid == res.seqid:
            if _occupancy(res) > _occupancy(kept[-1]):
                kept[-1] = res
        else:
            kept.append(res)
    return kept


def _pick_atoms(res: gemmi.Residue) -> dict[int, gemmi.Atom]:
    """The residue's atoms by atom37 slot, one per slot, resolving alternate locations.

    The conformer (altloc) with the highest mean occupancy is preferred, ties going to the
    first listed; an atom of that conformer (or of none) beats any other, then occupancy does.
    """
    renames = rc.MODIFIED_ATOM_RENAMES if res.name in _MODIFIED_NAMES else {}
    candidates = []
    for atom in res:
        slot = rc.ATOM37_INDEX.get(renames.get((res.name, atom.name), atom.name))
        if slot is not None:  # hydrogens and atoms without an atom37 slot drop out
            candidates.append((slot, atom))
    altloc_occupancies: dict[str, list[float]] = {}
    for _, atom in candidates:
        if atom.altloc != "\0":
            altloc_occupancies.setdefault(atom.altloc, []).append(atom.occ)
    picked: dict[int, gemmi.Atom] = {}
    if not altloc_occupancies:  # the common case: one conformer
        for slot, atom in candidates:
            picked.setdefault(slot, atom)
        return picked
    # max() returns the first of equal maxima, so ties go to the first-listed conformer.
    preferred = max(altloc_occupancies, key=lambda k: np.mean(altloc_occupancies[k]))
    ranks: dict[int, tuple[bool, float]] = {}
    for slot, atom in candidates:
        rank = (atom.altloc in ("\0", preferred), atom.occ)
        if slot not in ranks or rank > ranks[slot]:
            ranks[slot], picked[slot] = rank, atom
    return picked


_MODIFIED_NAMES = {name for name, _ in rc.MODIFIED_ATOM_RENAMES}


def _chain_from_gemmi(gchain: gemmi.Chain, path: Path, max_length: int | None) -> ProteinChain:
    def fail(message: str, reason: str) -> StructureError:
        return StructureError(message, path=path, chain=gchain.name, reason=reason)

    polymer = gchain.get_polymer()
    if len(polymer) == 0:
        raise fail("no polymer residues (only waters or ligands, or empty)", StructureError.EMPTY_CHAIN)
    polymer_type = polymer.check_polymer_type()
    if polymer_type not in (gemmi.PolymerType.PeptideL, gemmi.PolymerType.PeptideD):
        raise fail(f"not a protein (polymer type {polymer_type.name})", StructureError.NO_PROTEIN)
    residues = _drop_microheterogeneity(polymer)
    n = len(residues)
    if max_length is not None and n > max_length:
        raise fail(f"{n} residues, more than the maximum of {max_length}", StructureError.TOO_LONG)

    rows, slots, xyz, b_factor_L = [], [], [], np.empty(n, np.float32)
    for i, res in enumerate(residues):
        picked = _pick_atoms(res)
        for slot, atom in picked.items():
            rows.append(i)
            slots.append(slot)
            xyz.append(atom.pos.tolist())
        # The CA's B-factor (where predictors put pLDDT); else the residue's mean.
        ca = picked.get(rc.CA_IDX)
        b_factor_L[i] = ca.b_iso if ca else np.mean([a.b_iso for a in picked.values()]) if picked else np.nan
    xyz_Nx3 = np.asarray(xyz, np.float32).reshape(-1, 3)
    # A present atom must have a real position: NaN/inf parsed from the file, or an absurd
    # magnitude, is corrupt input (a NaN would otherwise pass silently as "atom missing").
    with np.errstate(invalid="ignore"):
        corrupt_N = ~(np.abs(xyz_Nx3) < MAX_ABS_COORDINATE).all(-1)
    if corrupt_N.any():
        k = int(np.argmax(corrupt_N))
        res = residues[rows[k]]
        raise fail(
            f"{int(corrupt_N.sum())} atoms with NaN, infinite or absurd (>= {MAX_ABS_COORDINATE:g} Å) "
            f"coordinates, first: {res.name} {res.seqid} {rc.ATOM37_NAMES[slots[k]]} at {xyz[k]}",
            StructureError.BAD_COORDINATES,
        )
    coords_Lx37x3 = np.full((n, rc.NUM_ATOM37, 3), np.nan, np.float32)
    coords_Lx37x3[rows, slots] = xyz_Nx3

    record = ProteinChain(
        sequence="".join(_one_letter(res.name) for res in residues),
        coords=coords_Lx37x3,
        residue_index=np.array([res.seqid.num for res in residues]),
        insertion_code=np.array([res.seqid.icode.strip() for res in residues], np.str_),
        b_factor=b_factor_L,
        residue_name=np.array([res.name for res in residues], np.str_),
        chain_id=gchain.name,
        source=str(path),
    )
    if record.n_backbone == 0:
        raise fail(f"none of its {n} residues has all of N, CA and C", StructureError.NO_BACKBONE)
    return record


def _file_chains(
    path: Path, chain: str | None, max_length: int | None
) -> Iterator[ProteinChain | StructureError]:
    """Each protein chain of the file's first model, or the error that stops it being one.

    With `chain` None, chains that are not protein at all (nucleic acids, waters, ligands) are
    silently passed over; a named chain is always reported, whatever is wrong with it.
    """
    st = _read_gemmi(path)
    model = st[0]
    if chain is not None:
        matches = [c for c in model if c.name == chain]
        if not matches:
            names = ", ".join(repr(c.name) for c in model)
            yield StructureError(
                f"no such chain (the file has {names})", path=path, chain=chain, reason=StructureError.CHAIN_NOT_FOUND
            )
            return
        gchains = matches[:1]
    else:
        gchains = list(model)
    found_protein = False
    for gchain in gchains:
        try:
            yield _chain_from_gemmi(gchain, path, max_length)
            found_protein = True
        except StructureError as e:
            if chain is None and e.reason in (StructureError.NO_PROTEIN, StructureError.EMPTY_CHAIN):
                continue
            found_protein = True
            yield e
    if chain is None and not found_protein:
        yield StructureError("no protein chain in the first model", path=path, reason=StructureError.NO_PROTEIN)


def read_chains(
    path: str | Path, chain: str | None = None, *, max_length: int | None = None
) -> Iterator[ProteinChain | StructureError]:
    """Per protein chain of the file, the chain or the StructureError that rules it out.

    For callers that report every bad chain by name (e.g. a rejects list). Iterating raises
    StructureError for an unreadable file and FileNotFoundError for a missing one.
    """
    return _file_chains(Path(path), chain, max_length)


def load_structure(
    path: str | Path, chain: str | None = None, *, max_length: int | None = None
) -> list[ProteinChain]:
    """The protein chains of a PDB/mmCIF file (plain or .gz), first model; or just `chain`.

    Strict: any unusable protein chain raises StructureError naming the file and chain (use
    `iter_chains` to skip bad chains instead). A chain longer than `max_length` is unusable.
    """
    chains = []
    for item in read_chains(path, chain, max_length=max_length):
        if isinstance(item, StructureError):
            raise item
        chains.append(item)
    return chains


def chain_name(path: str | Path, chain_id: str) -> str:
    """One chain of a structure file, named for output files and reports: the file name up to its
    first dot, then _CHAIN, unless the name already ends with that (1A0J_A.pdb chain A -> 1A0J_A,
    not 1A0J_A_A; chain B -> 1A0J_A_B)."""
    stem = Path(path).name.split(".")[0]
    return stem if stem.endswith(f"_{chain_id}") else f"{stem}_{chain_id}"


def load_chain(path: str | Path, chain: str, *, max_length: int | None = None) -> ProteinChain:
    """One chain by author chain id."""
    return load_structure(path, chain, max_length=max_length)[0]


def iter_chains(
    items: Iterable[str | Path | tuple[str | Path, str]],
    *,
    max_length: int | None = None,
    skipped: collections.Counter | None = None,
) -> Iterator[ProteinChain]:
    """Every usable chain of many files, skipping bad ones and counting them by reason.

    An item is a path (all its protein chains) or a (path, chain_id) pair. `skipped`, when
    given, is incremented per skipped chain (or whole file) under StructureError's reason keys,
    plus "missing_file". A bad chain never costs its file's good chains.
    """
    skipped = collections.Counter() if skipped is None else skipped
    for item in items:
        path, chain = (item if isinstance(item, tuple) else (item, None))
        try:
            for record in read_chains(path, chain, max_length=max_length):
                if isinstance(record, StructureError):
                    skipped[record.reason] += 1
                    logger.info("skipping %s", record)
                else:
                    yield record
        except FileNotFoundError as e:
            skipped["missing_file"] += 1
            logger.info("skipping %s", e)
        except StructureError as e:  # the whole file is unreadable
            skipped[e.reason] += 1
            logger.info("skipping %s", e)


# ---------------------------------------------------------------------------------------------
# Writing


def _as_chains(record: ProteinChain | ProteinComplex | Sequence[ProteinChain]) -> tuple[ProteinChain, ...]:
    if isinstance(record, ProteinChain):
        return (record,)
    if isinstance(record, ProteinComplex):
        return record.chains
    return tuple(record)


def to_gemmi(
    record: ProteinChain | ProteinComplex | Sequence[ProteinChain], *, canonical_names: bool = False
) -> gemmi.Structure:
    """A one-model gemmi Structure of the record's chains, entities set up.

    Residue names are the ones read from the file (so MSE is written back as MSE with its SE);
    `canonical_names` writes the parent residue instead (MET/SD; X as UNK), for tools such as
    mkdssp that look every residue up in their own dictionary.
    """
    chains = _as_chains(record)
    st = gemmi.Structure()
    st.name = "esm3_jax"
    model = gemmi.Model("1")
    for chain in chains:
        gchain = gemmi.Chain(chain.chain_id)
        for i in range(len(chain)):
            if canonical_names:
                name = rc.RESTYPE_1TO3.get(chain.sequence[i], rc.UNKNOWN_RESIDUE_NAME)
            else:
                name = str(chain.residue_name[i])
            res = gemmi.Residue()
            res.name = name
            res.seqid = gemmi.SeqId(int(chain.residue_index[i]), chain.insertion_code[i] or " ")
            res.het_flag = "A" if name in rc.RESTYPE_3TO1 else "H"
            renames = {parent: atom for (rname, atom), parent in rc.MODIFIED_ATOM_RENAMES.items() if rname == name}
            for slot in np.flatnonzero(chain.atom_mask[i]):
                atom = gemmi.Atom()
                atom.name = renames.get(rc.ATOM37_NAMES[slot], rc.ATOM37_NAMES[slot])
                atom.element = gemmi.Element(atom.name[:2] if atom.name == "SE" else rc.ATOM37_ELEMENTS[slot])
                atom.pos = gemmi.Position(*chain.coords[i, slot].tolist())
                atom.occ = 1.0
                atom.b_iso = float(chain.b_factor[i])
                res.add_atom(atom)
            gchain.add_residue(res)
        model.add_chain(gchain)
    st.add_model(model)
    # Entities and label_asym ids set by hand rather than by setup_entities(), whose subchain
    # names ("Axp") do not fit tools that expect short ids (mkdssp refuses them).
    for k, gchain in enumerate(st[0]):
        asym = _asym_id(k)
        for res in gchain:
            res.subchain = asym
            res.entity_type = gemmi.EntityType.Polymer
        entity = gemmi.Entity(str(k + 1))
        entity.entity_type = gemmi.EntityType.Polymer
        entity.polymer_type = gemmi.PolymerType.PeptideL
        entity.subchains = [asym]
        entity.full_sequence = [res.name for res in gchain]
        st.entities.append(entity)
    st.assign_label_seq_id(True)
    st.assign_serial_numbers()
    return st


def _asym_id(k: int) -> str:
    """mmCIF label_asym_id of the k-th chain: A..Z, then AA, BA, ... as the PDB does."""
    letters = ""
    while True:
        letters += chr(ord("A") + k % 26)
        k = k // 26 - 1
        if k < 0:
            return letters


def _poly_seq_scheme(st: gemmi.Structure) -> dict[str, list]:
    """The _pdbx_poly_seq_scheme table, which gemmi does not write but mkdssp requires."""
    table = collections.defaultdict(list)
    for gchain in st[0]:
        polymer = gchain.get_polymer()
        entity = st.get_entity_of(polymer)
        for res in polymer:
            num, icode = str(res.seqid.num), res.seqid.icode.strip() or "."
            for key, value in (
                ("asym_id", res.subchain), ("entity_id", entity.name), ("seq_id", str(res.label_seq)),
                ("mon_id", res.name), ("ndb_seq_num", str(res.label_seq)), ("pdb_seq_num", num),
                ("auth_seq_num", num), ("pdb_mon_id", res.name), ("auth_mon_id", res.name),
                ("pdb_strand_id", gchain.name), ("pdb_ins_code", icode),
                ("hetero", "y" if res.het_flag == "H" else "n"),
            ):  # fmt: skip
                table[key].append(value)
    return dict(table)


def to_mmcif_string(record, *, canonical_names: bool = False) -> str:
    st = to_gemmi(record, canonical_names=canonical_names)
    doc = st.make_mmcif_document()
    block = doc.sole_block()
    block.set_mmcif_category("_pdbx_poly_seq_scheme.", _poly_seq_scheme(st))
    return doc.as_string()


def to_pdb_string(record, *, canonical_names: bool = False) -> str:
    return to_gemmi(record, canonical_names=canonical_names).make_pdb_string()


def write_structure(path: str | Path, record: ProteinChain | ProteinComplex | Sequence[ProteinChain]) -> Path:
    """Write PDB (.pdb, .ent) or mmCIF (.cif, .mmcif), gzipped when the name ends in .gz.

    B-factors carry each residue's `b_factor`, so a prediction's pLDDT lands where viewers and
    `load_structure` expect it.
    """
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    kind = suffixes[-2] if gz and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    if kind in (".cif", ".mmcif"):
        text = to_mmcif_string(record)
    elif kind in (".pdb", ".ent"):
        text = to_pdb_string(record)
    else:
        raise ValueError(f"{path}: cannot tell the format; use .pdb, .ent, .cif or .mmcif (optionally .gz)")
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path
