"""The Grain input pipeline, on shards built from real proteins in ../shared/data.

Sequences and DSSP8 come from sidechainnet's PDB chains; coordinates from registry PDB files. No
structure-token encoder is available to tests, so structure records carry stand-in codes (random
but fixed): the pipeline only moves, masks and pads them, it never interprets a code.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import zlib

import numpy as np
import pytest

from esm3_jax import tokens as T
from esm3_jax.data import pipeline as P
from esm3_jax.data import records as R
from esm3_jax.data.config import DataConfig, DatasetSpec, NoiseConfig
from tests.paths import DATA, STRUCTURES

SIDECHAINNET = DATA / "sequences" / "pdb_chains_seq_dssp8.sidechainnet.jsonl.gz"

NO_DROPOUT = NoiseConfig(**{f"{t}_dropout": 0.0 for t in ("structure", "coordinates", "ss8", "sasa", "function",
                                                          "residue_annotation")})


def _require_data():
    if not SIDECHAINNET.is_file() or not (STRUCTURES / "index.jsonl").is_file():
        pytest.skip(f"real protein data not found under {DATA}")


def _sidechainnet_records(n: int, min_len: int = 0, max_len: int = 10**9) -> list[R.ProteinRecord]:
    out = []
    with gzip.open(SIDECHAINNET, "rt") as f:
        for line in f:
            row = json.loads(line)
            if min_len <= len(row["seq"]) <= max_len:
                out.append(R.ProteinRecord(
                    id=row["id"], source="sidechainnet", sequence_tokens=row["seq"],
                    ss8_tokens=T.encode_ss8(row["dssp8"], add_special_tokens=False),
                ))
                if len(out) == n:
                    return out
    return out


def _structure_records(n: int) -> list[R.ProteinRecord]:
    """N/CA/C of real registry chains (NaN where an atom is missing), with stand-in structure codes."""
    import gemmi

    rows = [json.loads(line) for line in (STRUCTURES / "index.jsonl").open()]
    rows = [r for r in rows if r["source"].startswith("theseus") and r["n_res"] <= 240][:n]
    rng = np.random.default_rng(7)
    out = []
    for row in rows:
        st = gemmi.read_structure(str(STRUCTURES / row["file"]))
        st.setup_entities()
        chain = next(c for c in st[0] if c.name == row["chain"])
        seq, coords = [], []
        for res in chain.get_polymer():
            info = gemmi.find_tabulated_residue(res.name)
            seq.append(info.one_letter_code.upper() if info and info.one_letter_code.isalpha() else "X")
            xyz = np.full((3, 3), np.nan, np.float32)
            for k, atom in enumerate(("N", "CA", "C")):
                found = res.find_atom(atom, "*")
                if found:
                    xyz[k] = found.pos.tolist()
            coords.append(xyz)
        n_res = len(seq)
        out.append(R.ProteinRecord(
            id=f"{row['pdb_id']}_{row['chain']}", source=row["file"], sequence_tokens="".join(seq),
            coordinates=np.stack(coords), structure_tokens=rng.integers(0, T.STRUCTURE_CODEBOOK_SIZE, n_res),
            chain_id=np.zeros(n_res, np.int32),
        ))
    return out


@pytest.fixture(scope="module")
def seq_dir(tmp_path_factory):
    _require_data()
    d = tmp_path_factory.mktemp("seq")
    R.write_shards(_sidechainnet_records(300, 30, 200), d, records_per_shard=128)
    return d


@pytest.fixture(scope="module")
def struct_records():
    _require_data()
    return _structure_records(24)


@pytest.fixture(scope="module")
def struct_dir(tmp_path_factory, struct_records):
    d = tmp_path_factory.mktemp("struct")
    R.write_shards(struct_records, d, records_per_shard=10)
    return d


def _cfg(*dirs, weights=None, **kw) -> DataConfig:
    weights = weights or [1.0] * len(dirs)
    kw = {"max_length": 256, "batch_size": 8, **kw}
    cfg = DataConfig(datasets=tuple(DatasetSpec(str(d), w) for d, w in zip(dirs, weights)), **kw)
    cfg.validate()
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _proteins(batches):
    """Every packed protein of some batches: dicts of that protein's positions, in order."""
    for batch in batches:
        for r in range(batch["sequence_id"].shape[0]):
            for s in np.unique(batch["sequence_id"][r]):
                if s:
                    idx = batch["sequence_id"][r] == s
                    yield {k: v[r][idx] for k, v in batch.items()}


def _batches_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


# --- one protein --------------------------------------------------------------------------------


def test_crop_keeps_bos_and_eos_only_on_uncut_sides():
    _require_data()
    long = _sidechainnet_records(1, 300)[0]
    n, max_length = len(long), 64
    wrapped = np.concatenate([[T.SEQUENCE_BOS], long.sequence_tokens, [T.SEQUENCE_EOS]])
    # A protein exactly max_length residues long has three windows: BOS kept, both cut, EOS kept.
    exact = R.ProteinRecord(id="exact", sequence_tokens=long.sequence_tokens[:max_length])
    exact_wrapped = wrapped[: max_length + 1].copy()
    exact_wrapped = np.append(exact_wrapped, T.SEQUENCE_EOS)
    cfg = dataclasses.replace(_cfg("unused", max_length=max_length), noise=NO_DROPOUT)
    seen = set()
    for seed in range(200):
        for rec, full in ((long, wrapped), (exact, exact_wrapped)):
            start, stop = P.crop_window(len(rec), max_length, "random", np.random.default_rng(seed))
            ex = P.make_example(rec, cfg, np.random.default_rng(seed))
            target = ex["sequence_target"]
            assert len(target) == max_length == stop - start
            np.testing.assert_array_equal(target, full[start:stop])
            assert (target[0] == T.SEQUENCE_BOS) == (start == 0)
            assert (target[-1] == T.SEQUENCE_EOS) == (stop == len(rec) + 2)
            assert not (ex["sequence_loss_mask"] & np.isin(target, [T.SEQUENCE_BOS, T.SEQUENCE_EOS])).any()
            if rec is exact:
                seen.add(start)
    assert seen == {0, 1, 2}
    head = P.make_example(long, dataclasses.replace(cfg, crop="head"), np.random.default_rng(0))
    np.testing.assert_array_equal(head["sequence_target"], wrapped[:max_length])  # BOS, no EOS
    short = _sidechainnet_records(1, 10, 60)[0]
    ex = P.make_example(short, cfg, np.random.default_rng(0))
    np.testing.assert_array_equal(ex["sequence_target"], np.r_[T.SEQUENCE_BOS, short.sequence_tokens, T.SEQUENCE_EOS])
    assert n > max_length + 2


def _check_example(rec: R.ProteinRecord, ex: dict):
    """Inputs are targets except at masked positions; losses only at masked, real residues."""
    seq_t = ex["sequence_target"]
    residue = ~np.isin(seq_t, [T.SEQUENCE_BOS, T.SEQUENCE_EOS, T.SEQUENCE_PAD, T.SEQUENCE_CHAINBREAK])
    mask_value = {"sequence": T.SEQUENCE_MASK, "structure": T.STRUCTURE_MASK}
    for track in ("sequence", "structure", "ss8", "sasa", "function", "residue_annotation"):
        inp, tgt, loss = ex[f"{track}_tokens"], ex[f"{track}_target"], ex[f"{track}_loss_mask"]
        masked = inp == mask_value.get(track, 0)
        if inp.ndim == 2:
            masked = masked.all(axis=1)
        assert not (loss & ~residue).any(), track
        assert not (loss & ~masked).any(), track
        kept = ~masked & residue
        np.testing.assert_array_equal(inp[kept], tgt[kept], err_msg=track)
    # Coordinates hide at least every position whose structure token is hidden.
    hidden_struct = (ex["structure_tokens"] == T.STRUCTURE_MASK) & residue
    coords_nan = np.isnan(ex["structure_coords"]).any(axis=(1, 2))
    assert not (hidden_struct & ~coords_nan).any()
    np.testing.assert_array_equal(ex["per_res_plddt"] > 0, ~coords_nan)


def test_make_example_masks_targets_and_losses(struct_records):
    cfg = _cfg("unused")
    struct_loss = 0
    for seed, rec in enumerate(struct_records * 4):
        ex = P.make_example(rec, cfg, np.random.default_rng(seed))
        _check_example(rec, ex)
        n = len(rec)
        assert len(ex["sequence_target"]) == n + 2
        np.testing.assert_array_equal(ex["structure_target"][1:-1], rec.structure_tokens)
        assert ex["structure_target"][0] == T.STRUCTURE_BOS and ex["structure_target"][-1] == T.STRUCTURE_EOS
        assert not ex["ss8_loss_mask"].any()  # the record has no SS8: pad targets, no loss
        assert (ex["ss8_target"] == T.SS8_PAD).all()
        struct_loss += ex["structure_loss_mask"].sum()
    assert struct_loss > 0


def test_sequence_only_record_has_no_structure_loss():
    _require_data()
    rec = _sidechainnet_records(1, 50, 100)[0]
    rec = R.ProteinRecord(id=rec.id, sequence_tokens=rec.sequence_tokens)  # a FASTA protein
    for seed in range(20):
        ex = P.make_example(rec, _cfg("unused"), np.random.default_rng(seed))
        _check_example(rec, ex)
        assert (ex["structure_target"] == T.STRUCTURE_PAD).all()
        assert (ex["structure_tokens"][1:-1] == T.STRUCTURE_MASK).all()
        assert ex["structure_tokens"][0] == T.STRUCTURE_BOS and ex["structure_tokens"][-1] == T.STRUCTURE_EOS
        for track in ("structure", "ss8", "sasa", "function", "residue_annotation"):
            assert not ex[f"{track}_loss_mask"].any(), track
        assert np.isnan(ex["structure_coords"]).all() and (ex["per_res_plddt"] == 0).all()
        assert (ex["average_plddt"] == 1.0).all()


def test_chain_break_is_never_masked_nor_scored(struct_records):
    a, b = struct_records[0], struct_records[1]
    cat = lambda x, y, mid: np.concatenate([x, np.asarray([mid], dtype=x.dtype), y])
    nan3 = np.full((1, 3, 3), np.nan, np.float32)
    complex_ = R.ProteinRecord(
        id="complex", sequence_tokens=cat(a.sequence_tokens, b.sequence_tokens, T.SEQUENCE_CHAINBREAK),
        structure_tokens=cat(a.structure_tokens, b.structure_tokens, T.STRUCTURE_CHAINBREAK),
        coordinates=np.concatenate([a.coordinates, nan3, b.coordinates]),
        chain_id=np.concatenate([np.zeros(len(a) + 1, int), np.ones(len(b), int)]),
    )
    cfg = _cfg("unused", max_length=len(complex_) + 2)
    brk = len(a) + 1  # index after BOS
    for seed in range(30):
        ex = P.make_example(complex_, cfg, np.random.default_rng(seed))
        _check_example(complex_, ex)
        assert ex["sequence_tokens"][brk] == T.SEQUENCE_CHAINBREAK
        assert ex["structure_tokens"][brk] == T.STRUCTURE_CHAINBREAK
        assert not any(ex[f"{t}_loss_mask"][brk] for t in ("sequence", "structure"))
        assert ex["chain_id"][0] == 0 and ex["chain_id"][-1] == 1


def test_track_dropout(struct_records):
    rec = struct_records[2]
    drop = dataclasses.replace(NO_DROPOUT, structure_dropout=1.0, coordinates_dropout=0.0)
    for seed in range(10):
        ex = P.make_example(rec, _cfg("unused", noise=drop), np.random.default_rng(seed))
        residue = np.arange(len(rec) + 2) % (len(rec) + 1) != 0
        assert (ex["structure_tokens"][residue] == T.STRUCTURE_MASK).all()
        assert np.isnan(ex["structure_coords"]).all()  # the superset rule hides every coordinate too
        np.testing.assert_array_equal(ex["structure_loss_mask"], residue)
    silent = dataclasses.replace(drop, loss_on_dropped_tracks=False)
    ex = P.make_example(rec, _cfg("unused", noise=silent), np.random.default_rng(0))
    assert not ex["structure_loss_mask"].any()


# --- the stream ---------------------------------------------------------------------------------


def test_same_seed_same_batches(seq_dir):
    cfg = _cfg(seq_dir)
    a = _take(P.make_iterator(cfg, process_index=0, process_count=1), 6)
    b = _take(P.make_iterator(cfg, process_index=0, process_count=1), 6)
    assert all(_batches_equal(x, y) for x, y in zip(a, b))
    assert set(a[0]) == set(P.BATCH_KEYS)
    c = _take(P.make_iterator(dataclasses.replace(cfg, seed=1), process_index=0, process_count=1), 6)
    assert not all(_batches_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("read_threads", [0, 2])
def test_resume_from_saved_state_mid_epoch(seq_dir, read_threads):
    cfg = _cfg(seq_dir, read_threads=read_threads)
    it = P.make_iterator(cfg, process_index=0, process_count=1)
    for steps in (3, 40):  # mid first epoch; then in the second epoch (~35 batches per epoch)
        _take(it, steps)
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
        expected = _take(it, 5)
        resumed = P.make_iterator(cfg, process_index=0, process_count=1)
        resumed.set_state(state)
        assert all(_batches_equal(x, y) for x, y in zip(expected, _take(resumed, 5)))


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_read_disjoint_slices_that_cover_the_dataset(seq_dir, hosts):
    seen = []
    for host in range(hosts):
        cfg = _cfg(seq_dir)
        batches = list(P.build_dataset(cfg, process_index=host, process_count=hosts, num_epochs=1,
                                       drop_remainder=False, with_source=True))
        assert all(b["sequence_id"].shape[0] <= cfg.batch_size // hosts for b in batches)
        indices = [int(p["source_index"][0]) for p in _proteins(batches)]
        assert len(indices) == len(set(indices)), "a protein was read twice by one host"
        seen.append(set(indices))
    assert sum(len(s) for s in seen) == 300
    assert set().union(*seen) == set(range(300))


def test_packing_is_block_diagonal_and_padding_is_inert(seq_dir):
    batches = _take(P.make_iterator(_cfg(seq_dir), process_index=0, process_count=1, with_source=True), 10)
    per_row = []
    for b in batches:
        for r in range(b["sequence_id"].shape[0]):
            sid = b["sequence_id"][r]
            ids = sid[sid > 0]
            per_row.append(ids.max())
            # Proteins occupy contiguous runs 1, 2, ..., n, then padding (0) to the end.
            runs = ids[np.r_[True, ids[1:] != ids[:-1]]]
            np.testing.assert_array_equal(runs, np.arange(1, len(runs) + 1))
            assert (sid[len(ids):] == 0).all()
            # One protein per run, and the attention mask is block-diagonal over those runs.
            for s in runs:
                assert len(np.unique(b["source_index"][r][sid == s])) == 1
            attend = sid[:, None] == sid[None, :]
            block = np.zeros_like(attend)
            for s in runs:
                block |= np.outer(sid == s, sid == s)
            np.testing.assert_array_equal(attend[sid > 0], block[sid > 0])
            pad = sid == 0
            assert (b["sequence_tokens"][r][pad] == T.SEQUENCE_PAD).all()
            assert (b["structure_tokens"][r][pad] == T.STRUCTURE_PAD).all()
            assert np.isnan(b["structure_coords"][r][pad]).all()
            for track in ("sequence", "structure", "ss8", "sasa", "function", "residue_annotation"):
                assert not b[f"{track}_loss_mask"][r][pad].any()
    assert max(per_row) >= 2, "no row held two proteins: packing was not exercised"
    unpacked = _take(P.make_iterator(_cfg(seq_dir, packing=False), process_index=0, process_count=1), 5)
    assert all(b["sequence_id"].max(axis=1).tolist() == [1] * 8 for b in unpacked)


def test_packed_proteins_do_not_see_each_other_through_the_model(struct_dir):
    esm3 = pytest.importorskip("esm3_jax.model.esm3", reason="model not available")
    import flax.linen as nn
    import jax

    from esm3_jax.batch import INPUT_KEYS
    from esm3_jax.model.config import ModelConfig

    batches = _take(P.make_iterator(_cfg(struct_dir, max_length=256, batch_size=4), process_index=0,
                                    process_count=1), 6)
    row = next(
        {k: v[r : r + 1] for k, v in b.items()}
        for b in batches for r in range(4) if b["sequence_id"][r].max() >= 2
    )
    inputs = {k: row[k] for k in INPUT_KEYS}
    model = esm3.ESM3(ModelConfig())
    # Any weights will do for an isolation test, so skip the (slow on CPU) initialisers: take the
    # parameter shapes from a trace and fill them with random normals.
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), **inputs)["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, **x))
    first, second = row["sequence_id"][0] == 1, row["sequence_id"][0] == 2
    perturbed = {k: np.array(v) for k, v in inputs.items()}
    perturbed["sequence_tokens"][0, second] = T.SEQUENCE_VOCAB.index("W")
    perturbed["structure_tokens"][0, second] = 7
    perturbed["structure_coords"][0, second] += 3.0
    base, other = apply(params, inputs), apply(params, perturbed)
    for key in ("sequence_logits", "structure_logits", "embeddings"):
        np.testing.assert_allclose(other[key][0, first], base[key][0, first], atol=1e-5, err_msg=key)
        assert not np.allclose(other[key][0, second], base[key][0, second], atol=1e-3), key


def test_mask_rates_follow_the_schedules(seq_dir, struct_dir):
    from esm3_jax.data.noise import mean_mask_rate

    def rates(cfg, epochs):
        batches = P.build_dataset(cfg, process_index=0, process_count=1, num_epochs=epochs, drop_remainder=False)
        return list(_proteins(batches))

    proteins = rates(_cfg(seq_dir, noise=NO_DROPOUT), 2)
    residue = np.concatenate([~np.isin(p["sequence_target"], [0, 2]) for p in proteins])
    seq_masked = np.concatenate([p["sequence_tokens"] == T.SEQUENCE_MASK for p in proteins])
    assert seq_masked[residue].mean() == pytest.approx(mean_mask_rate("betalinear30"), abs=0.03)
    ss8_masked = np.concatenate([(p["ss8_tokens"] == 0) for p in proteins])
    assert ss8_masked[residue].mean() == pytest.approx(mean_mask_rate("square_root"), abs=0.03)
    # Default config: SS8 dropped whole in ~90% of proteins.
    dropped = [((p["ss8_tokens"] == 0) | np.isin(p["sequence_target"], [0, 2])).all()
               for p in rates(_cfg(seq_dir), 2)]
    assert np.mean(dropped) == pytest.approx(0.9, abs=0.04)
    proteins = rates(_cfg(struct_dir, noise=NO_DROPOUT, max_length=512), 10)
    residue = np.concatenate([~np.isin(p["sequence_target"], [0, 2]) for p in proteins])
    struct_masked = np.concatenate([p["structure_tokens"] == T.STRUCTURE_MASK for p in proteins])
    assert struct_masked[residue].mean() == pytest.approx(mean_mask_rate("cosine"), abs=0.06)
    # A coordinate is shown only if neither its own (cubic) mask nor the structure-token (cosine)
    # mask hides it: independent draws, so E[shown] = (1 - 3/4) * (1 - 2/pi).
    shown = np.concatenate([np.isfinite(p["structure_coords"]).all(axis=(1, 2)) for p in proteins])
    expected = (1 - mean_mask_rate("cubic")) * (1 - mean_mask_rate("cosine"))
    assert shown[residue].mean() == pytest.approx(expected, abs=0.03)


def test_malformed_records_are_skipped_and_counted(tmp_path, seq_dir):
    from array_record.python.array_record_module import ArrayRecordWriter

    good = list(R.RecordReader(seq_dir))[:40]
    blob = R.serialize(good[0])
    forged = R._HEADER.pack(b"E3R", R.FORMAT_VERSION + 1, 3, 1, 0, 0) + b"\x04\x05\x06"
    bad = [
        blob[:-7],  # truncated
        forged + R._CRC.pack(zlib.crc32(forged)),  # a future version
        blob[:-5] + R._CRC.pack(zlib.crc32(blob[:-5])),  # SS8 one residue short of sequence
        b"",
        b"not a record at all",
    ]
    writer = ArrayRecordWriter(str(tmp_path / "mixed-00000-of-00001.array_record"), R.ARRAY_RECORD_OPTIONS)
    good_indices = []
    for i in range(len(good) + len(bad)):
        if i % 9 == 4 and bad:
            writer.write(bad.pop())
        else:
            good_indices.append(i)
            writer.write(R.serialize(good.pop()))
    writer.close()
    assert not bad
    it = P.make_iterator(_cfg(tmp_path), process_index=0, process_count=1, num_epochs=1,
                         drop_remainder=False, with_source=True)
    batches = list(it)
    seen = sorted(int(p["source_index"][0]) for p in _proteins(batches))
    assert seen == good_indices
    assert P.malformed_count(it) == 5


def test_mixture_follows_weights(seq_dir, struct_dir):
    cfg = _cfg(seq_dir, struct_dir, weights=[3.0, 1.0])
    batches = _take(P.make_iterator(cfg, process_index=0, process_count=1, with_source=True), 20)
    sources = [int(p["source_dataset"][0]) for p in _proteins(batches)]
    assert set(sources) == {0, 1}
    assert np.mean(np.asarray(sources) == 0) == pytest.approx(0.75, abs=0.06)


def test_global_arrays_are_sharded_over_data_axes(seq_dir):
    import jax

    from esm3_jax.train import sharding as shd
    from esm3_jax.train.config import LogicalRules

    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
    batch = next(P.make_iterator(_cfg(seq_dir), process_index=0, process_count=1))
    rules = LogicalRules().as_flax_rules()
    arrays = shd.global_batch(batch, shd.batch_shardings(batch, mesh, rules), len(batch["sequence_id"]))
    assert set(arrays) == set(P.BATCH_KEYS)
    for k, v in arrays.items():
        assert v.shape == batch[k].shape and v.dtype == batch[k].dtype
        assert v.sharding.spec[0] == ("data", "fsdp")
        np.testing.assert_array_equal(np.asarray(v), batch[k])


def test_bad_settings_fail_early(seq_dir, tmp_path):
    with pytest.raises(ValueError, match="does not divide over 3 hosts"):
        P.build_dataset(_cfg(seq_dir), process_index=0, process_count=3)
    with pytest.raises(ValueError, match="data.datasets is empty"):
        P.build_dataset(DataConfig(), process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="no \\*.array_record shards"):
        P.build_dataset(_cfg(tmp_path), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="unknown schedule"):
        _cfg(seq_dir, noise=NoiseConfig(ss8_schedule="cosin"))


def test_bench_pipeline_reports_throughput(seq_dir):
    from esm3_jax.bench.data import bench_pipeline

    out = bench_pipeline(seq_dir, _cfg("unused"), n_batches=5, warmup=1)
    assert out["records_per_s"] > 0 and out["tokens_per_s"] > 0
    assert 0 < out["row_fill"] <= 1 and out["proteins_per_row"] >= 1
    assert out["tokens_per_s"] <= out["padded_tokens_per_s"]


def test_orbax_checkpoint_of_the_iterator_resumes_exactly(seq_dir, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    import grain

    cfg = _cfg(seq_dir)
    it = P.make_iterator(cfg, process_index=0, process_count=1)
    _take(it, 7)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(7, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _take(it, 4)
    resumed = P.make_iterator(cfg, process_index=0, process_count=1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(7, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(resumed)))
    assert all(_batches_equal(x, y) for x, y in zip(expected, _take(resumed, 4)))


def test_worker_processes_resume_exactly(seq_dir):
    cfg = _cfg(seq_dir, worker_count=2)
    it = P.make_iterator(cfg, process_index=0, process_count=1)
    try:
        _take(it, 3)
        state = json.loads(json.dumps(it.get_state()))
        expected = _take(it, 3)
    finally:
        it.close()
    resumed = P.make_iterator(cfg, process_index=0, process_count=1)
    try:
        resumed.set_state(state)
        assert all(_batches_equal(x, y) for x, y in zip(expected, _take(resumed, 3)))
        assert P.malformed_count(state) == 0
    finally:
        resumed.close()


def test_data_config_from_yaml(tmp_path, seq_dir):
    from esm3_jax.config import ConfigError
    from esm3_jax.train.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text(
        "data:\n"
        f"  datasets:\n    - path: {seq_dir}\n      weight: 2.0\n    - path: {seq_dir}\n"
        "  max_length: 128\n  packing: false\n  crop: head\n  worker_count: 0\n"
        "  noise:\n    ss8_dropout: 0.5\n    sequence_schedule: cosine\n"
    )
    cfg = load_config(path, ["data.noise.structure_dropout=0.1", "data.seed=3"]).data
    assert [d.weight for d in cfg.datasets] == [2.0, 1.0]
    assert (cfg.max_length, cfg.packing, cfg.crop, cfg.seed) == (128, False, "head", 3)
    assert (cfg.noise.ss8_dropout, cfg.noise.structure_dropout, cfg.noise.sequence_schedule) == (0.5, 0.1, "cosine")
    assert cfg.noise.coordinates_schedule == "cubic"  # untouched knobs keep the paper's values
    batch = next(P.make_iterator(cfg, process_index=0, process_count=1))
    assert batch["sequence_tokens"].shape == (8, 128)
    with pytest.raises(ConfigError, match="ss8_dropuot"):
        load_config(path, ["data.noise.ss8_dropuot=0.5"])
    with pytest.raises(ConfigError, match="must be in \\[0, 1\\]"):
        load_config(path, ["data.noise.ss8_dropout=1.5"])
