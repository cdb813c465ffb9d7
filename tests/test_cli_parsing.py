"""The command line's argument parsing, apart from what any verb does."""

from __future__ import annotations

import pytest

from esm3_jax import cli


def test_overrides_on_both_sides_of_an_option(monkeypatch):
    # `esm3-jax train-vqvae --config C a=1 --eval-only b=2`: every key=value reaches the verb.
    import esm3_jax.train.vqvae.run as verb

    seen = {}
    monkeypatch.setattr(verb, "cli_main", lambda args: seen.update(vars(args)) or 0)
    argv = ["train-vqvae", "--config", "c.yaml", "train.output_dir=/x", "--no-progress", "--eval-only",
            "train.eval_max_length=96", "train.max_valid_chains=3"]
    assert cli.main(argv) == 0
    assert seen["overrides"] == ["train.output_dir=/x", "train.eval_max_length=96", "train.max_valid_chains=3"]
    assert seen["eval_only"] and seen["no_progress"]


def test_verb_with_subcommands_still_parses(monkeypatch):
    import esm3_jax.bench.cli as verb

    seen = {}
    monkeypatch.setattr(verb, "cli_main", lambda args: seen.update(vars(args)) or 0)
    assert cli.main(["bench", "vqvae-handedness", "--mixes", "distance"]) == 0
    assert seen["what"] == "vqvae-handedness" and seen["mixes"] == ["distance"]


def test_unknown_option_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train-vqvae", "--config", "c.yaml", "--no-such-option"])
    assert e.value.code == 2
