"""The training run's config: optimiser, schedule, checkpointing and device-mesh settings
(ESM3_SPEC section 7), composed with the model and data sections into the one `Config` that
`train`, `aot` and `bench` load."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from esm3_jax.batch import TRACKS
from esm3_jax.config import load_config_file
from esm3_jax.data.config import DataConfig, DatasetSpec
from esm3_jax.model.config import ModelConfig
from esm3_jax.model.layers import LORA_A, LORA_B, LORA_TARGETS, LoraSpec
from esm3_jax.runtime import cpu_matmul



@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weight of each track's mean masked-position loss in the total (spec 7.2: not published)."""

    sequence: float = 1.0
    structure: float = 1.0
    ss8: float = 1.0
    sasa: float = 1.0
    function: float = 1.0
    residue_annotation: float = 1.0

    def as_dict(self) -> dict[str, float]:
        return {t: getattr(self, t) for t in TRACKS}

    def validate(self) -> None:
        for track, w in self.as_dict().items():
            if w < 0:
                raise ValueError(f"train.loss_weights.{track} must be >= 0, got {w}")
        if not any(self.as_dict().values()):
            raise ValueError("train.loss_weights: every weight is 0, nothing would be trained")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    learning_rate: float = 4e-4  # peak, reached after warmup
    seed: int = 0  # parameter init and the step RNG (data order has its own seed, data.seed)
    # Schedule: linear warmup from 0, then cosine decay to min_lr_ratio * peak at `steps`.
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    # AdamW (spec 7.4). Decay applies to every parameter whose '/'-joined path matches none of
    # no_decay_patterns (regular expressions): by default norms, biases and embeddings are exempt.
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01
    no_decay_patterns: tuple[str, ...] = ("bias$", "scale$", "embedding$", "(?i)norm", "(?i)embed")
    grad_clip_norm: float = 1.0  # global norm; 0 disables clipping
    grad_accum_steps: int = 1  # microbatches per optimizer step (scanned inside one jit)
    loss_weights: LossWeights = dataclasses.field(default_factory=LossWeights)
    # A step whose loss or gradient norm is not finite is skipped (no update) and counted;
    # this many in a row stop the run.
    max_nonfinite_in_a_row: int = 5
    # Where the run writes: <output_dir>/checkpoints, <output_dir>/tensorboard, <output_dir>/profile.
    output_dir: str = "runs/default"
    checkpoint_every: int = 100  # steps; the final step is always saved
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    resume: bool = True  # pick up the latest complete checkpoint in output_dir/checkpoints
    log_every: int = 1  # steps between TensorBoard scalars
    # Validation: every eval_every steps (0: never), eval_batches batches of the held-out
    # datasets (same format as data.datasets), each pass from the start of the split.
    eval_every: int = 0
    eval_batches: int = 2
    eval_datasets: tuple[DatasetSpec, ...] = ()
    # Capture a jax.profiler trace of steps [first, last] (1-based, inclusive); empty: none.
    profile_steps: tuple[int, ...] = ()
    # Peak dense bf16 FLOP/s of one device for the MFU readout; 0 looks the device kind up.
    peak_flops_per_device: float = 0.0
    # The library XLA:CPU runs the step's plain matmuls with: "eigen" (measured faster on the
    # development machine) or "ynn" (XLA's default); esm3_jax/cpu_matmul.py. Ignored off the CPU.
    cpu_matmul: str = cpu_matmul.DEFAULT
    # Fine-tuning. init_from: a params checkpoint (`esm3-jax convert`) or an esm3-jax run (its
    # output_dir or checkpoints/ folder) whose parameters the run starts from, with a fresh
    # optimizer state at step 0; the model config must match the saved one (train/finetune.py).
    # The run's own checkpoints, once it has some, win: a restart resumes, it does not re-init.
    init_from: str = ""
    # Regular expressions (searched in '/'-joined parameter paths such as
    # trunk/geom_block_0/geom_attn/proj or sequence_head/out): only matching parameters train,
    # the rest are frozen with no optimizer state. Empty: everything trains.
    trainable: tuple[str, ...] = ()
    # LoRA: lora_rank > 0 adds adapters W + (lora_alpha / lora_rank) A @ B beside the kernels named
    # in lora_targets (of every block; A random, B zero, so step 0 is the base model) and trains
    # them alone, plus whatever train.trainable names (e.g. the heads); the base kernels are frozen
    # with no optimizer state. Checkpoints hold the adapters; every verb that reads the run's
    # parameters (generate, evaluate, forward, convert --export) gets them merged into the kernels.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    wandb: bool = False  # also log to Weights & Biases (needs `pip install wandb`)
    wandb_project: str = "esm3-jax"
    progress_bar: bool = True

    def lora_spec(self) -> LoraSpec | None:
        return LoraSpec(self.lora_rank, self.lora_alpha, tuple(self.lora_targets)) if self.lora_rank else None

    @property
    def trainable_patterns(self) -> tuple[str, ...]:
        """What trains (train/optim.py's trainable_mask): train.trainable, and with LoRA the
        adapters as well; empty: everything."""
        return self.trainable + ((f"({LORA_A}|{LORA_B})$",) if self.lora_rank else ())

    @property
    def checkpoint_dir(self) -> str:
        return f"{self.output_dir.rstrip('/')}/checkpoints"

    @property
    def tensorboard_dir(self) -> str:
        return f"{self.output_dir.rstrip('/')}/tensorboard"

    @property
    def profile_dir(self) -> str:
        return f"{self.output_dir.rstrip('/')}/profile"

    def validate(self) -> None:
        positive = ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "grad_accum_steps",
                    "eval_batches", "max_nonfinite_in_a_row")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "weight_decay", "grad_clip_norm", "peak_flops_per_device"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"train.learning_rate must be positive, got {self.learning_rate}")
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"train.warmup_steps={self.warmup_steps} must be smaller than train.steps={self.steps}"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.eps <= 0:
            raise ValueError(f"train.eps must be positive, got {self.eps}")
        if self.lora_rank < 0:
            raise ValueError(f"train.lora_rank must be >= 0 (0: no adapters), got {self.lora_rank}")
        if self.lora_rank:
            if self.lora_alpha <= 0:
                raise ValueError(f"train.lora_alpha must be positive, got {self.lora_alpha}")
            unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
            if unknown or not self.lora_targets:
                raise ValueError(f"train.lora_targets: {unknown or 'empty'}; choose among {list(LORA_TARGETS)}")
        for key in ("no_decay_patterns", "trainable"):
            for pattern in getattr(self, key):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"train.{key}: bad regular expression {pattern!r}: {e}") from e
        if self.profile_steps and (
            len(self.profile_steps) != 2 or not 1 <= self.profile_steps[0] <= self.profile_steps[1]
        ):
            raise ValueError(
                f"train.profile_steps must be [first, last] with 1 <= first <= last, got {list(self.profile_steps)}"
            )
        if self.eval_every and not self.eval_datasets:
            raise ValueError("train.eval_every is set but train.eval_datasets is empty: name the held-out split")
        if not self.output_dir:
            raise ValueError("train.output_dir must not be empty")
        if self.cpu_matmul not in cpu_matmul.LIBRARIES:
            raise ValueError(f"train.cpu_matmul must be one of {', '.join(cpu_matmul.LIBRARIES)}, got {self.cpu_matmul!r}")
        self.loss_weights.validate()


# Mesh axis names, outermost first: data parallel, fully sharded data parallel, tensor parallel.
MESH_AXES = ("data", "fsdp", "tensor")
# Logical axis names the model (and the batch) use.
LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv", "vocab", "input_vocab", "layers", "geom_heads")


@dataclasses.dataclass(frozen=True)
class LogicalRules:
    """Which mesh axes shard each logical axis; () replicates it.

    Defaults: FSDP shards the embedding dimension of every weight (and with it the optimizer
    state), tensor parallelism shards the MLP, head and vocabulary dimensions, and the batch
    is split over both data-parallel axes.
    """

    batch: tuple[str, ...] = ("data", "fsdp")
    length: tuple[str, ...] = ()
    embed: tuple[str, ...] = ("fsdp",)
    mlp: tuple[str, ...] = ("tensor",)
    heads: tuple[str, ...] = ("tensor",)
    kv: tuple[str, ...] = ()
    vocab: tuple[str, ...] = ("tensor",)  # output heads' logits
    # Input embedding tables: replicated rows, so a lookup never needs a gather across devices.
    input_vocab: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    geom_heads: tuple[str, ...] = ()

    def as_flax_rules(self) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
        """The rules in the form `flax.linen.logical_axis_rules` takes."""
        out = []
        for name in LOGICAL_AXES:
            axes = getattr(self, name)
            out.append((name, None if not axes else axes[0] if len(axes) == 1 else tuple(axes)))
        return tuple(out)

    def validate(self) -> None:
        for name in LOGICAL_AXES:
            axes = getattr(self, name)
            for a in axes:
                if a not in MESH_AXES:
                    raise ValueError(f"mesh.rules.{name}: unknown mesh axis {a!r}; mesh axes are {list(MESH_AXES)}")
            if len(set(axes)) != len(axes):
                raise ValueError(f"mesh.rules.{name}: mesh axis repeated in {list(axes)}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (data, fsdp, tensor). One axis may be -1: all devices the other two leave."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # The TPU slice a config is sized for (e.g. "v5p-256"): what `esm3-jax aot` compiles for when
    # no --topology is given. It does not change a run; "" names none.
    topology: str = ""
    rules: LogicalRules = dataclasses.field(default_factory=LogicalRules)

    def shape(self, n_devices: int) -> tuple[int, int, int]:
        """The (data, fsdp, tensor) shape for `n_devices`, resolving the -1 axis."""
        sizes = [self.data, self.fsdp, self.tensor]
        if -1 in sizes:
            rest = int(abs(sizes[0] * sizes[1] * sizes[2]))
            sizes[sizes.index(-1)] = n_devices // rest if n_devices % rest == 0 else 0
        if min(sizes) <= 0 or sizes[0] * sizes[1] * sizes[2] != n_devices:
            raise ValueError(
                f"mesh data={self.data} x fsdp={self.fsdp} x tensor={self.tensor} does not fit "
                f"{n_devices} devices"
            )
        return sizes[0], sizes[1], sizes[2]

    def validate(self) -> None:
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise ValueError(f"mesh.{name} must be positive or -1 (all remaining devices), got {size}")
        if list(sizes.values()).count(-1) > 1:
            raise ValueError(f"mesh: at most one axis may be -1, got {sizes}")
        self.rules.validate()


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def validate(self) -> None:
        for section in (self.model, self.data, self.train, self.mesh):
            if hasattr(section, "validate"):
                section.validate()
        if self.model.attention.startswith("splash") and self.data.max_length % 128:
            raise ValueError(
                f"model.attention={self.model.attention} needs data.max_length to be a multiple of 128 "
                f"(the kernel's block), got {self.data.max_length}"
            )


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a run config (or the defaults), apply `a.b=value` overrides, validate."""
    return load_config_file(Config, path, overrides)


# The configs/ folder of the source tree: `--config small` means configs/small.yaml.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def resolve_config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / f"{name_or_path}.yaml", CONFIG_DIR / name_or_path):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"config '{name_or_path}': no such file, and no configs/{name_or_path}.yaml")
