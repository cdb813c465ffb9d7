"""Generation (esm3_jax/inference/generate.py): token parity with the reference's ESM3.generate,
batch independence, prompt preservation, seeding, and the `generate` verb end to end."""

from __future__ import annotations

import os

import numpy as np
import pytest

from esm3_jax import tokens as T
from esm3_jax.cli import main
from esm3_jax.compat.params_io import save_params
from esm3_jax.compat.esm3_weights import infer_esm3_config, torch_to_esm3_params
from esm3_jax.compat.reference import attach_generation_tokenizers
from esm3_jax.inference.generate import (
    GenerateError,
    annealed_temperature,
    generate,
    generate_chain,
    still_masked_after,
)
from tests.reference import build_reference_esm3, import_reference

D, H, VH, NL = 64, 4, 8, 2
DETERMINISTIC = dict(strategy="entropy", temperature=0.0, temperature_annealing=False)


@pytest.fixture(scope="module")
def models():
    """The reference ESM3 with random weights (and the tokenizers its generate needs), and the
    same weights converted for ours."""
    torch, _ = import_reference()
    model, state = build_reference_esm3(D, H, VH, NL, seed=5)
    attach_generation_tokenizers(model)
    cfg = infer_esm3_config(state, H)
    # One thread: on a shared CI machine torch's default pool (one per core) spends ~20x longer
    # waiting than computing on these tiny matrices.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model, cfg, torch_to_esm3_params(state, cfg)
    torch.set_num_threads(threads)


def _protein(rng, n, mask_frac=0.5, track="sequence"):
    """One protein of n residues (+BOS/EOS): random sequence and structure tokens, a random-walk
    backbone; `mask_frac` of `track`'s residues masked."""
    seq = T.encode_sequence("".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), n)))
    struct = np.concatenate([[T.STRUCTURE_BOS], rng.integers(0, 4096, n), [T.STRUCTURE_EOS]]).astype(np.int32)
    ca = np.cumsum(rng.normal(size=(n, 3)) * 2.2, axis=0)
    xyz = np.stack([ca + [0.5, 1.3, 0.0], ca, ca - [1.5, 0.0, 0.0]], axis=1) + rng.normal(size=(n, 3, 3)) * 0.3
    coords = np.full((n + 2, 3, 3), np.nan, np.float32)
    coords[1:-1] = xyz
    hide = np.zeros(n + 2, bool)
    hide[1 + rng.permutation(n)[: max(mask_frac > 0, int(mask_frac * n))]] = True
    if track == "sequence":
        seq = np.where(hide, T.SEQUENCE_MASK, seq)
    else:
        struct = np.where(hide, T.STRUCTURE_MASK, struct)
    return dict(sequence_tokens=seq.astype(np.int32), structure_tokens=struct, structure_coords=coords)


def _batch(proteins):
    """Right-pad single proteins into one batch with each track's pad."""
    L = max(len(p["sequence_tokens"]) for p in proteins)
    pads = dict(sequence_tokens=T.SEQUENCE_PAD, structure_tokens=T.STRUCTURE_PAD, structure_coords=np.nan)
    out = {}
    for k, pad in pads.items():
        rows = []
        for p in proteins:
            a = p[k]
            rows.append(np.pad(a, [(0, L - len(a))] + [(0, 0)] * (a.ndim - 1), constant_values=pad))
        out[k] = np.stack(rows)
    return out


def _reference_generate(model, protein, track, num_steps, with_coords):
    torch, _ = import_reference()
    from esm.sdk.api import ESMProteinTensor, GenerationConfig

    os.environ["DISABLE_ITERATIVE_SAMPLING_TQDM"] = "1"
    tensor = ESMProteinTensor(
        sequence=torch.from_numpy(protein["sequence_tokens"].astype(np.int64)),
        structure=torch.from_numpy(protein["structure_tokens"].astype(np.int64)),
        coordinates=torch.from_numpy(protein["structure_coords"]) if with_coords else None,
    )
    config = GenerationConfig(track=track, num_steps=num_steps, schedule="cosine",
                              condition_on_coordinates_only=False, **DETERMINISTIC)
    with torch.no_grad():
        out = model.generate(tensor, config)
    return getattr(out, track).numpy()


@pytest.mark.parametrize("track,num_steps,with_coords", [
    ("sequence", 1, True), ("sequence", 4, True), ("structure", 1, False), ("structure", 3, False),
])
def test_matches_reference_generate(models, track, num_steps, with_coords):
    model, cfg, params = models
    rng = np.random.default_rng(num_steps + 10 * with_coords)
    protein = _protein(rng, 30, track=track)
    if not with_coords:
        protein["structure_coords"][:] = np.nan
    ref = _reference_generate(model, protein, track, num_steps, with_coords)
    x = {k: v[None] for k, v in protein.items()}
    got = generate(cfg, params, x, track, num_steps, **DETERMINISTIC)[f"{track}_tokens"][0]
    # Exact token equality: every sampled token is an argmax and every commit an entropy rank.
    np.testing.assert_array_equal(got, ref)
    assert not np.any(got == (T.SEQUENCE_MASK if track == "sequence" else T.STRUCTURE_MASK))


def test_function_track_matches_reference_one_step(models):
    """Function tokens (one step: every masked position from the same forward pass). The reference
    argmax may pick pad/motif/unk (ids 0-2), which we never emit (a 0 would read as masked again);
    everywhere else the sub-tokens, and the <none> decisions, must be the reference's."""
    torch, _ = import_reference()
    from esm.sdk.api import ESMProteinTensor, GenerationConfig

    model, cfg, params = models
    p = _protein(np.random.default_rng(11), 40, mask_frac=0.0)
    L = len(p["sequence_tokens"])
    fn = np.zeros((L, T.FUNCTION_DEPTH), np.int32)
    tensor = ESMProteinTensor(sequence=torch.from_numpy(p["sequence_tokens"].astype(np.int64)),
                              function=torch.from_numpy(fn.astype(np.int64)))
    config = GenerationConfig(track="function", num_steps=1, strategy="entropy", temperature=1.0, temperature_annealing=False)
    with torch.no_grad():
        ref = model.generate(tensor, config).function.numpy()[1:-1]
    got = generate(cfg, params, dict(sequence_tokens=p["sequence_tokens"][None], function_tokens=fn[None]), "function", 1,
                   strategy="entropy", temperature=1.0, temperature_annealing=False)["function_tokens"][0, 1:-1]
    np.testing.assert_array_equal(got == T.FUNCTION_NONE, ref == T.FUNCTION_NONE)
    ordinary = ref > T.FUNCTION_UNK
    assert ordinary.mean() > 0.9
    np.testing.assert_array_equal(got[ordinary], ref[ordinary])
    assert np.all(got > T.FUNCTION_UNK)


def test_schedule_and_annealing_match_reference_arithmetic():
    """Our host-side counts equal the reference's float32 torch arithmetic
    (_get_iterative_sampling_mask_for_prompt_and_step) for every total <= 120 and num_steps <= 20."""
    torch, _ = import_reference()
    from esm.utils.generation import _get_annealed_temperature
    from esm.utils.noise_schedules import NOISE_SCHEDULE_REGISTRY

    for schedule in ("cosine", "linear"):
        for total in range(1, 121):
            for n in range(1, min(total, 20) + 1):
                for t in range(n):
                    frac = NOISE_SCHEDULE_REGISTRY[schedule](torch.tensor((t + 1) / n))
                    want = int((frac * torch.tensor(total) + 0.1).int())
                    assert still_masked_after(t, n, total, schedule) == want, (schedule, total, n, t)
    for n in (1, 2, 7):
        for t in range(n):
            assert annealed_temperature(t, n, 0.7) == _get_annealed_temperature(t, n, 0.7)


def test_batch_independence_seeds_and_prompt(models):
    """Random strategy at temperature 1: the same seed gives the same tokens, another seed others;
    running the rows one at a time (so in a 64-position bucket instead of the batch's 128, and
    without their batch mates) gives the same tokens, because padding is kept out of attention
    and draws are keyed by (seed, step, row, position); given positions and padding never change."""
    _, cfg, params = models
    rng = np.random.default_rng(3)
    proteins = [_protein(rng, n, mask_frac=0.6) for n in (12, 40, 70)]
    batch = _batch(proteins)
    opts = dict(strategy="random", temperature=1.0, temperature_annealing=True)
    a = generate(cfg, params, batch, "sequence", 5, seed=1, **opts)["sequence_tokens"]
    np.testing.assert_array_equal(a, generate(cfg, params, batch, "sequence", 5, seed=1, **opts)["sequence_tokens"])
    assert np.any(a != generate(cfg, params, batch, "sequence", 5, seed=2, **opts)["sequence_tokens"])
    one_by_one = generate(cfg, params, batch, "sequence", 5, seed=1, batch_size=1, **opts)["sequence_tokens"]
    np.testing.assert_array_equal(a, one_by_one)
    for i, p in enumerate(proteins):
        n = len(p["sequence_tokens"])
        given = p["sequence_tokens"] != T.SEQUENCE_MASK
        np.testing.assert_array_equal(a[i, :n][given], p["sequence_tokens"][given])
        assert np.all(a[i, n:] == T.SEQUENCE_PAD)  # padding untouched
        assert np.all((a[i, 1 : n - 1] >= 4) & (a[i, 1 : n - 1] <= 30))  # amino acids only


def test_other_tracks_and_chain(models):
    """SS8, SASA and function fill their masked (= pad id 0) positions with ordinary ids only,
    leaving BOS/EOS/padding at 0; the chain-of-thought helper runs several tracks in order."""
    _, cfg, params = models
    rng = np.random.default_rng(6)
    batch = _batch([_protein(rng, 20, mask_frac=0.0), _protein(rng, 14, mask_frac=0.0)])
    B, L = batch["sequence_tokens"].shape
    batch.update(ss8_tokens=np.zeros((B, L), np.int32), sasa_tokens=np.zeros((B, L), np.int32),
                 function_tokens=np.zeros((B, L, 8), np.int32))
    out = generate_chain(cfg, params, batch, [("ss8", 3), ("sasa", 2), ("function", 2)], **DETERMINISTIC)
    inside = batch["sequence_tokens"] > 3
    assert np.all((out["ss8_tokens"][inside] >= 3) & (out["ss8_tokens"][inside] <= 10))
    assert np.all((out["sasa_tokens"][inside] >= 3) & (out["sasa_tokens"][inside] <= 18))
    fn = out["function_tokens"][inside]
    assert np.all(fn >= T.FUNCTION_NONE) and np.all((fn == T.FUNCTION_NONE).all(1) | (fn != T.FUNCTION_NONE).all(1))
    for k in ("ss8_tokens", "sasa_tokens"):
        assert np.all(out[k][~inside] == 0)
    np.testing.assert_array_equal(out["sequence_tokens"], batch["sequence_tokens"])


def test_bad_requests(models):
    _, cfg, params = models
    p = _protein(np.random.default_rng(7), 10, mask_frac=0.0)
    x = {k: v[None] for k, v in p.items()}
    with pytest.raises(GenerateError, match="no masked 'sequence'"):
        generate(cfg, params, x, "sequence", 2)
    with pytest.raises(GenerateError, match="unknown track 'coordinates'"):
        generate(cfg, params, x, "coordinates", 2)


def test_cli_end_to_end(tmp_path, capsys):
    torch, _ = import_reference()
    _, state = build_reference_esm3(32, 2, 4, 2, seed=3)
    pth = tmp_path / "small.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, pth)
    ckpt = tmp_path / "ckpt"
    assert main(["convert", "--torch-state-dict", str(pth), "--n-heads", "2", "--out", str(ckpt)]) == 0
    rng = np.random.default_rng(8)
    batch = _batch([_protein(rng, 16, mask_frac=0.5), _protein(rng, 9, mask_frac=0.5)])
    np.savez(tmp_path / "in.npz", **batch)
    args = ["generate", "--checkpoint", str(ckpt), "--inputs", str(tmp_path / "in.npz"), "--track", "sequence",
            "--num-steps", "3", "--strategy", "entropy", "--temperature", "0.5", "--seed", "1", "--out", str(tmp_path / "out.npz")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "generate: sequence at" in printed and "row 1:" in printed
    out = dict(np.load(tmp_path / "out.npz"))
    assert set(out) == set(batch)
    assert not np.any(out["sequence_tokens"] == T.SEQUENCE_MASK)
    # Bad input: nothing masked on the structure track -> exit code 2, the file named.
    assert main([*args[:6], "structure", *args[7:]]) == 2
    err = capsys.readouterr().err
    assert "in.npz" in err and "no masked 'structure'" in err
    # A file that is not an .npz, and a checkpoint of another kind of model.
    (tmp_path / "bad.npz").write_text("not an npz")
    assert main([*args[:4], str(tmp_path / "bad.npz"), *args[5:]]) == 2
    assert "bad.npz: not a readable .npz" in capsys.readouterr().err
    save_params(tmp_path / "vq", {"w": np.zeros(2, np.float32)}, {"d_model": 8}, kind="vqvae")
    assert main([*args[:2], str(tmp_path / "vq"), *args[3:]]) == 2
    assert "holds a 'vqvae' model, not esm3" in capsys.readouterr().err


# --- parity on real chains: folding, inverse folding and SS8, as the issue lists them ---------------

REAL_CHAINS = (  # short registry chains with complete backbones (tests/paths.py: ../shared/data)
    ("mdanalysis_mmcif/5PTI.cif.gz", "A"),  # BPTI, 58 residues
    ("biopython_tests/1A8O.cif.gz", "A"),  # 70 residues, an MSE read as X
    ("misc_small/debian_1tii_C.pdb.gz", "C"),  # 36 residues
)


@pytest.fixture(scope="module")
def real_chains():
    from esm3_jax.structure.io import load_structure
    from tests.paths import STRUCTURES

    if not STRUCTURES.is_dir():
        pytest.skip(f"real structures not found at {STRUCTURES} (the shared data folder is absent)")
    return [load_structure(STRUCTURES / f, c)[0] for f, c in REAL_CHAINS]


def _reference_task(model, task, chain, num_steps):
    """The reference's own generation for one protein, as its users call it: folding and SS8 from
    the sequence alone (every other track None), inverse folding from the backbone coordinates
    alone (sequence all mask, condition_on_coordinates_only, the non-standard letters invalid)."""
    torch, _ = import_reference()
    from esm.sdk.api import ESMProteinTensor, GenerationConfig

    from esm3_jax.inference.tasks import NONSTANDARD_SEQUENCE_IDS

    os.environ["DISABLE_ITERATIVE_SAMPLING_TQDM"] = "1"
    n = len(chain)
    if task == "inverse-fold":
        coords = np.full((n + 2, 37, 3), np.inf, np.float32)  # inf at BOS/EOS, as ESM3.encode frames them
        coords[1:-1] = chain.coords
        tensor = ESMProteinTensor(sequence=torch.from_numpy(T.encode_sequence("_" * n).astype(np.int64)),
                                  coordinates=torch.from_numpy(coords[:, :3].copy()))
        track, invalid = "sequence", list(NONSTANDARD_SEQUENCE_IDS)
    else:
        tensor = ESMProteinTensor(sequence=torch.from_numpy(T.encode_sequence(chain.sequence).astype(np.int64)))
        track, invalid = {"fold": "structure", "ss8": "secondary_structure"}[task], []
    config = GenerationConfig(track=track, num_steps=num_steps, schedule="cosine", invalid_ids=invalid,
                              condition_on_coordinates_only=True, **DETERMINISTIC)
    with torch.no_grad():
        out = model.generate(tensor, config)
    # The logits of the reference's last forward pass are not returned; the per-step near-tie
    # check below recomputes ours.
    return getattr(out, track).numpy()


def _ours(cfg, params, task, chains, num_steps, **options):
    """Our tokens for the same task over `chains` in one batch (rows right-padded)."""
    from esm3_jax.batch import stack_proteins
    from esm3_jax.inference.tasks import fold_inputs, inverse_fold_inputs, NONSTANDARD_SEQUENCE_IDS

    if task == "fold":
        out = generate(cfg, params, fold_inputs([c.sequence for c in chains]), "structure", num_steps, **options)
        return out["structure_tokens"]
    if task == "ss8":
        rows = [{k: v for k, v in T.encode_protein(c.sequence).items() if k in ("sequence_tokens", "ss8_tokens")}
                for c in chains]
        return generate(cfg, params, stack_proteins(rows), "ss8", num_steps, **options)["ss8_tokens"]
    rows = [inverse_fold_inputs(c.backbone, 1) for c in chains]
    rows = [{k: v[0] for k, v in r.items()} for r in rows]
    out = generate(cfg, params, stack_proteins(rows), "sequence", num_steps, never_sample=NONSTANDARD_SEQUENCE_IDS, **options)
    return out["sequence_tokens"]


@pytest.mark.parametrize("task,num_steps", [("fold", 1), ("fold", 8), ("inverse-fold", 8), ("ss8", 8)])
def test_tasks_match_reference_on_real_chains(models, real_chains, task, num_steps):
    """Exact tokens against the reference's ESM3.generate, one protein at a time there, all three
    chains (36, 58, 70 residues) in one batch here."""
    model, cfg, params = models
    ours = _ours(cfg, params, task, real_chains, num_steps, **DETERMINISTIC)
    for i, chain in enumerate(real_chains):
        ref = _reference_task(model, task, chain, num_steps)
        got = ours[i, : len(chain) + 2]
        np.testing.assert_array_equal(got, ref, err_msg=f"{task} {num_steps} steps, {chain.source} {chain.chain_id}")
        assert np.all(ours[i, len(chain) + 2 :] == {"fold": T.STRUCTURE_PAD, "ss8": 0, "inverse-fold": T.SEQUENCE_PAD}[task])


def test_real_chains_batched_equal_one_at_a_time(models, real_chains):
    """Inverse folding the three chains (36, 58, 70 residues) at temperature 1, random order: one
    batch (a 128-position bucket) gives each chain the tokens it gets alone (64 or 128), the same
    seed the same tokens, another seed others."""
    _, cfg, params = models
    opts = dict(strategy="random", temperature=1.0, temperature_annealing=True)
    batched = _ours(cfg, params, "inverse-fold", real_chains, 8, seed=3, **opts)
    alone = _ours(cfg, params, "inverse-fold", real_chains, 8, seed=3, batch_size=1, **opts)
    np.testing.assert_array_equal(batched, alone)
    np.testing.assert_array_equal(batched, _ours(cfg, params, "inverse-fold", real_chains, 8, seed=3, **opts))
    assert np.any(batched != _ours(cfg, params, "inverse-fold", real_chains, 8, seed=4, **opts))
