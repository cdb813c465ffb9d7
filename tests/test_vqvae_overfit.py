"""configs/vqvae_overfit.yaml, shortened: encoder, codebook and decoder trained on two real chains
given as a plain folder of structure files (`--data`), then those chains decoded from their
tokens through the exported checkpoints: close to the truth and never closer to its mirror image.
The full-size run and its numbers are in BENCHMARKS.md (issue 20)."""

from __future__ import annotations

import json
import shutil

import pytest

from esm3_jax.cli import main
from tests.paths import CONFIGS, STRUCTURES

FILES = ("mdanalysis_mmcif/5PTI.cif.gz", "mustang_testdata/1paa.pdb.gz")  # 58 and 30 residues
SHORT = [
    "encoder.d_model=32", "encoder.v_heads=4", "encoder.n_codes=64", "decoder.d_model=64", "decoder.n_layers=2",
    "decoder.n_heads=4", "train.max_chain_length=64", "train.crop_length=64", "train.batch_size=2",
    "train.eval_max_length=64", "train.steps=200", "train.vq_warmup_steps=80", "train.log_every=50",
    "train.checkpoint_every=1000",
]
MAX_RMSD = 4.0  # Å, every chain; the untrained decoder is at ~10 Å


def test_overfit_two_chains_from_a_plain_folder(tmp_path, capsys):
    if not STRUCTURES.is_dir():
        pytest.skip(f"real structures not found at {STRUCTURES} (the shared data folder is absent)")
    data = tmp_path / "structures"  # no index.jsonl: every chain of every file trains
    data.mkdir()
    for f in FILES:
        shutil.copy(STRUCTURES / f, data)
    out = tmp_path / "run"
    args = ["train-vqvae", "--config", str(CONFIGS / "vqvae_overfit.yaml"), "--no-progress", "--data", str(data),
            *SHORT, f"train.output_dir={out}"]
    assert main(args) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["split"] == "train" and result["chains"] == 2
    chains = {c["name"]: c for c in result["per_chain"]}
    assert set(chains) == {"5PTI.cif.gz/A", "1paa.pdb.gz/K"}
    for name, c in chains.items():
        assert c["backbone_rmsd"] < MAX_RMSD, (name, c)
        assert c["backbone_rmsd"] < c["mirror_rmsd"] - 0.5, (name, c)  # right-handed, clearly
    assert result["mirror_closer_fraction"] == 0.0
    capsys.readouterr()

    # A folder without an index has no valid split; a missing folder is a one-line error.
    assert main([*args, "train.eval_split=valid", f"train.output_dir={tmp_path / 'x'}"]) == 2
    assert "no index.jsonl, so no 'valid' split" in capsys.readouterr().err
    assert main(["train-vqvae", "--config", str(CONFIGS / "vqvae_overfit.yaml"), "--data", str(tmp_path / "none")]) == 2
    assert "--data must be a folder" in capsys.readouterr().err
