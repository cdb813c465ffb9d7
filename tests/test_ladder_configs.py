"""The paper's ladder as shipped configs (configs/esm3_1.4b.yaml, esm3_7b.yaml, esm3_98b.yaml).

Compiling a 98B train step takes many minutes, so this test does not: it checks that each config
keeps within what `esm3-jax aot` has shown to fit (BENCHMARKS.md, "The paper's ladder as
launchable configs"): the slice it names, no more sequences per chip in a microbatch than a
compile that fitted, a ~4M-token global batch, and the paper's token budget. Change a config's
batch, accumulation or slice and this fails until a compile backs the change and the table
below is updated."""

import math

import pytest

from esm3_jax.train.aot import TOPOLOGIES
from esm3_jax.train.config import load_config
from esm3_jax.train.loop import check_run_config
from tests.paths import CONFIGS

# config -> (slice, sequences per chip in one microbatch that `aot` compiled and found to fit,
# the paper's training tokens, ESM3_SPEC 2.3). Each shipped config was compiled for its slice with
# no overrides: 2.75 GiB (1.4B, v5p-128), 6.44 GiB (7B, v5p-512), 32.20 GiB (98B, v5p-256) per chip
# of 95.7 GiB; before accumulation the 98B needed 235 GiB of temporaries per chip.
VERIFIED = {
    "esm3_1.4b": ("v5p-128", 1, 75e9),
    "esm3_7b": ("v5p-512", 1, 560e9),
    "esm3_98b": ("v5p-256", 1, 1.8e12),
}


def _chips(topology: str) -> int:
    return math.prod(int(n) for n in TOPOLOGIES[topology].libtpu_name.split(":")[1].split("x"))


@pytest.mark.parametrize("name", sorted(VERIFIED))
def test_ladder_config_fits_the_slice_aot_verified(name):
    slice_name, verified_per_chip, paper_tokens = VERIFIED[name]
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.mesh.topology == slice_name
    chips = _chips(slice_name)
    tokens_per_step = cfg.data.batch_size * cfg.data.max_length
    assert 3.5e6 <= tokens_per_step <= 4.5e6, tokens_per_step
    assert abs(cfg.train.steps * tokens_per_step / paper_tokens - 1) < 0.01
    # What a launch on that slice checks first (4 chips per v5p host), then the memory bound: the
    # per-chip microbatch is what the compiled step's activations scale with.
    check_run_config(cfg, chips, chips // 4, need_datasets=False)
    microbatch = cfg.data.batch_size // cfg.train.grad_accum_steps
    assert microbatch % chips == 0 and microbatch // chips <= verified_per_chip, (microbatch, chips)
    assert cfg.model.remat == "full" and cfg.model.compute_dtype == "bfloat16"


def test_demo_configs_read_what_launch_local_writes():
    """launch/local.sh writes runs/demo/...; configs/demo.yaml and vqvae_demo.yaml read it there."""
    from esm3_jax.train.vqvae.config import load_vqvae_config
    from tests.paths import REPO

    script = (REPO / "launch" / "local.sh").read_text()
    cfg = load_config(CONFIGS / "demo.yaml")
    for spec in (*cfg.data.datasets, *cfg.train.eval_datasets):
        assert spec.path.startswith("runs/demo/records/") and spec.path.split("/")[-1] in script, spec.path
    assert cfg.train.output_dir.startswith("runs/demo/")
    vq = load_vqvae_config(CONFIGS / "vqvae_demo.yaml")
    assert vq.train.stage == 1 and vq.train.vq_warmup_steps < vq.train.steps
