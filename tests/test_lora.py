"""LoRA fine-tuning (`train.lora_rank`): adapters beside the attention and FFN kernels.

A reference PyTorch ESM3 with random weights at the tiny shape is converted (`esm3-jax convert`);
configs/finetune_tiny_lora.yaml trains rank-4 adapters on it for 3 steps on synthetic batches.
Step 0 is the base model exactly (B starts at zero); the base kernels stay bit-identical and hold
no optimizer state, the adapters move; `convert --export` merges W + alpha/r A @ B into a plain
state dict that the reference loads with strict=True and that reproduces the fine-tuned model's
outputs; `forward` and a run started from the LoRA run (what `evaluate` loads) see the merged
weights; the adapters keep logical axis names (sharding) and give the same gradients under remat.
~1 min on 2 cores, mostly XLA compiles.
"""

import re

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esm3_jax.batch import INPUT_KEYS, random_inputs, synthetic_train_batch
from esm3_jax.cli import main as cli_main
from esm3_jax.compat.params_io import load_params, read_checkpoint
from esm3_jax.model.esm3 import ESM3
from esm3_jax.train.config import load_config
from esm3_jax.train.loop import train
from esm3_jax.train.optim import param_path
from tests.paths import CONFIGS
from tests.reference import relative_error

D, H, VH, NL = 64, 4, 8, 2  # configs/finetune_tiny_lora.yaml's model
ROWS, LENGTH = 4, 32
ADAPTER = re.compile(r"_lora_[ab]$")


class SyntheticBatches(grain.DatasetIterator):
    def __init__(self):
        super().__init__()
        self.k = 0

    def __next__(self):
        self.k += 1
        return synthetic_train_batch(ROWS, LENGTH, seed=self.k - 1)

    def get_state(self):
        return {"k": self.k}

    def set_state(self, state):
        self.k = state["k"]


def _flat(tree) -> dict[str, np.ndarray]:
    return {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _cfg(out, *extra):
    return load_config(CONFIGS / "finetune_tiny_lora.yaml", [
        f"train.output_dir={out}", f"data.max_length={LENGTH}", f"data.batch_size={ROWS}", "train.eval_every=0",
        "train.progress_bar=false", "train.async_checkpointing=false", *extra])


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(jax_cache):
    yield


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from esm3_jax.compat.convert import write_torch_state_dict
    from tests.reference import build_reference_esm3

    model, state = build_reference_esm3(D, H, VH, NL, seed=0)
    work = tmp_path_factory.mktemp("lora")
    write_torch_state_dict(state, work / "esm3_tiny.pth")
    assert cli_main(["convert", "--torch-state-dict", str(work / "esm3_tiny.pth"), "--n-heads", str(H),
                     "--out", str(work / "base")]) == 0
    cfg = _cfg(work / "run", f"train.init_from={work / 'base'}", "train.steps=3", "train.warmup_steps=1",
               "train.learning_rate=0.01", "train.checkpoint_every=3")
    from esm3_jax.train.setup import setup_training

    initial = setup_training(cfg, jax.devices()).initial_state()  # what train() starts from
    train(cfg, make_train_iter=SyntheticBatches)
    return dict(torch_model=model, work=work, cfg=cfg, base=_flat(load_params(work / "base")[2]),
                initial=initial, after=read_checkpoint(work / "run" / "checkpoints"))


def _apply(cfg, lora: bool):
    """The model (with adapters or plain), jitted: eager op-by-op application is far slower."""
    model = ESM3(cfg.model, lora=cfg.train.lora_spec() if lora else None)
    return jax.jit(lambda params, inputs: model.apply({"params": params}, **inputs))


def test_step_0_is_the_base_model_exactly(lora_run):
    cfg, state = lora_run["cfg"], lora_run["initial"]
    params = _flat(state.params)
    assert {k for k in params if not ADAPTER.search(k)} == set(lora_run["base"])
    assert all(not np.any(params[k]) for k in params if k.endswith("_lora_b"))
    inputs = {k: jnp.asarray(v) for k, v in synthetic_train_batch(ROWS, LENGTH, seed=0).items() if k in INPUT_KEYS}
    with_adapters = _apply(cfg, lora=True)(state.params, inputs)
    plain = _apply(cfg, lora=False)(load_params(lora_run["work"] / "base")[2], inputs)
    for k in plain:
        np.testing.assert_array_equal(np.asarray(with_adapters[k]), np.asarray(plain[k]), err_msg=k)


def test_only_the_adapters_train_and_hold_optimizer_state(lora_run):
    final, initial = _flat(lora_run["after"]["state"]["params"]), _flat(lora_run["initial"].params)
    adapters = {k for k in final if ADAPTER.search(k)}
    # Four adapted kernels (qkv, out, up, down) in the geometric block and in the scanned stack.
    assert len(adapters) == 2 * 4 * 2
    for k in final:
        if k in adapters:  # B leaves zero at step 1, A moves from step 2 on
            assert not np.array_equal(final[k], initial[k]), f"{k} is an adapter but did not move"
        else:
            np.testing.assert_array_equal(final[k], lora_run["base"][k], err_msg=f"{k} is frozen but moved")
    moments = [np.asarray(x) for x in jax.tree.leaves(lora_run["after"]["state"]["opt_state"]) if np.ndim(x) > 0]
    assert sum(x.size for x in moments) == 2 * sum(final[k].size for k in adapters)


def test_merged_export_loads_strictly_into_the_reference_and_gives_the_fine_tuned_outputs(lora_run, tmp_path):
    import torch

    from esm3_jax.compat.reference import reference_forward
    from tests.reference import build_reference_esm3

    run = lora_run["work"] / "run"
    cfg = lora_run["cfg"]
    assert cli_main(["convert", "--export", str(run), "--out", str(tmp_path / "merged.pth")]) == 0
    reference, _ = build_reference_esm3(D, H, VH, NL, seed=1)  # other weights, overwritten below
    reference.load_state_dict(torch.load(tmp_path / "merged.pth", weights_only=True), strict=True)
    inputs = synthetic_train_batch(ROWS, LENGTH, seed=7)
    inputs = {k: inputs[k] for k in INPUT_KEYS}
    # The fine-tuned model as trained: the base kernels plus the adapters' detour.
    params = jax.tree.map(jnp.asarray, lora_run["after"]["state"]["params"])
    ours = _apply(cfg, lora=True)(params, inputs)
    ref = reference_forward(reference, inputs)
    for k, v in ref.items():
        np.testing.assert_allclose(np.asarray(ours[k]), v, rtol=1e-5, atol=1e-5, err_msg=k)
    # The fine-tuning changed the model: the merged kernels are not the base ones.
    assert not np.allclose(ref["sequence_logits"], reference_forward(lora_run["torch_model"], inputs)["sequence_logits"])
    # `forward` (and `generate`, through the same loader) reads the LoRA run merged.
    np.savez(tmp_path / "in.npz", **{k: v for k, v in inputs.items() if k == "sequence_tokens"})
    assert cli_main(["forward", "--checkpoint", str(run), "--inputs", str(tmp_path / "in.npz"),
                     "--out", str(tmp_path / "out.npz")]) == 0
    seq_only = reference_forward(reference, {"sequence_tokens": inputs["sequence_tokens"]})
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["sequence_logits"], seq_only["sequence_logits"],
                               rtol=1e-5, atol=1e-5)


def test_a_run_started_from_a_lora_run_gets_the_merged_weights(lora_run, tmp_path):
    """What `evaluate` and `train.init_from` read: the plain model's tree, adapters merged."""
    from esm3_jax.model.lora import merge_adapters
    from esm3_jax.train.setup import setup_training

    cfg = load_config(CONFIGS / "tiny.yaml", [f"train.output_dir={tmp_path}", f"train.init_from={lora_run['work'] / 'run'}"])
    params = _flat(setup_training(cfg, jax.devices()).initial_state().params)
    merged = _flat(merge_adapters(lora_run["after"]["state"]["params"], lora_run["cfg"].train.lora_alpha))
    assert params.keys() == merged.keys() == lora_run["base"].keys()
    for k in params:
        np.testing.assert_array_equal(params[k], merged[k], err_msg=k)
    assert not np.array_equal(merged["trunk/blocks/block/ffn/down"], lora_run["base"]["trunk/blocks/block/ffn/down"])


def test_adapters_are_sharded_by_name_and_work_under_remat(tmp_path):
    import dataclasses

    import flax.linen as nn

    from esm3_jax.model.layers import rotary_cos_sin
    from esm3_jax.model.transformer import REMAT_POLICIES, Block

    cfg = _cfg(tmp_path)
    model = ESM3(cfg.model, lora=cfg.train.lora_spec())
    inputs = {k: jnp.asarray(v) for k, v in random_inputs(2, 16).items()}
    boxed = jax.eval_shape(lambda r: model.init(r, **inputs), jax.random.PRNGKey(0))["params"]
    specs = {param_path(p): tuple(s) for p, s in
             jax.tree_util.tree_leaves_with_path(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))}
    assert specs["trunk/blocks/block/attn/qkv_lora_a"] == ("layers", "embed", None)
    assert specs["trunk/blocks/block/attn/qkv_lora_b"] == ("layers", None, None, "heads", "kv")
    assert specs["trunk/geom_block_0/ffn/down_lora_a"] == ("mlp", None)
    assert specs["trunk/geom_block_0/attn/out_lora_b"] == (None, "embed")
    # One block with adapters, plain and under nn.remat (as the trunk wraps it): the same
    # gradients. B is made non-zero so that A's gradients are not trivially zero.
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, D))
    cos, sin = rotary_cos_sin(16, D // H)
    plain_block = Block(cfg.model, lora=cfg.train.lora_spec())
    params = nn.unbox(plain_block.init(jax.random.PRNGKey(0), x, None, cos, sin))["params"]
    params = jax.tree_util.tree_map_with_path(lambda p, v: v + 0.1 if param_path(p).endswith("_lora_b") else v, params)
    remat_block = nn.remat(Block, policy=REMAT_POLICIES["full"])(dataclasses.replace(cfg.model, remat="full"),
                                                                  lora=cfg.train.lora_spec())

    def grads(block):
        loss = lambda p: jnp.mean(block.apply({"params": p}, x, None, cos, sin) ** 2)
        return _flat(jax.jit(jax.grad(loss))(params))

    plain, full = grads(plain_block), grads(remat_block)
    assert plain.keys() == full.keys() and any(k.endswith("_lora_a") for k in plain)
    for k in plain:  # remat recomputes the forward in another fusion: fp32 rounding only
        assert relative_error(full[k], plain[k]) < 1e-5, k
    assert np.any(plain["attn/qkv_lora_a"])


def test_bad_lora_settings_exit_2(tmp_path, capsys):
    base = ["train", "--config", str(CONFIGS / "finetune_tiny_lora.yaml"), f"train.output_dir={tmp_path / 'run'}"]
    assert cli_main([*base, "train.lora_rank=-1"]) == 2
    assert "train.lora_rank must be >= 0" in capsys.readouterr().err
    assert cli_main([*base, "train.lora_targets=[attn/qkv, ffn/gate]"]) == 2
    assert "train.lora_targets: ['ffn/gate']" in capsys.readouterr().err
