"""The train-vqvae config (configs/vqvae_*.yaml): encoder, decoder and training settings, read
and validated by the shared loader esm3_jax.config.load_config_file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from esm3_jax.config import load_config_file
from esm3_jax.model.vqvae import DecoderConfig, EncoderConfig

# Squared-error clamps. The paper gives no values; (5 Å)^2 is a recollection (ESM3_SPEC 5.4). A
# clamped pair has no gradient, so while most pairs are off by more than the clamp (early
# training, long crops) only short-range geometry is learned: see BENCHMARKS.md.
DISTANCE_CLAMP = 25.0
DIRECTION_CLAMP = 20.0


@dataclasses.dataclass(frozen=True)
class LossWeights:
    distance: float = 1.0
    direction: float = 1.0
    distogram: float = 1.0
    direction_bins: float = 1.0
    inverse_folding: float = 1.0
    commitment: float = 1.0  # on top of the codebook's own 0.25
    # Backbone FAPE: not in the paper, chiral. The frame convention is consistent (tests/
    # test_vqvae_conventions.py); what decides a fold's handedness is which loss dominates early:
    # the unclamped distance loss (Å^2, achiral) outweighs FAPE (Å / 10) a hundredfold, so a
    # share of chains settles into the mirror image. FAPE only fixes that at a weight that
    # dominates and without its clamp (train.fape_clamp); BENCHMARKS.md, issue 20.
    fape: float = 0.0
    plddt: float = 0.0  # stage 2
    pae: float = 0.0  # stage 2
    # Stage 2 with an all-atom decoder (decoder.all_atom): the distance and direction losses over
    # atom14, the torsion-angle loss and its unit-norm penalty (AlphaFold 2 weighs that 0.02).
    all_atom_distance: float = 0.0
    all_atom_direction: float = 0.0
    torsion: float = 0.0
    torsion_norm: float = 0.0

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"train.loss_weights.{f.name} must be >= 0, got {getattr(self, f.name)}")


@dataclasses.dataclass(frozen=True)
class VQVAETrainSettings:
    stage: int = 1
    encoder_checkpoint: str = ""  # stage 2: the frozen encoder (a structure-encoder params dir)
    # Stage 2: a structure-decoder params dir (e.g. the stage-1 run's decoder/) whose weights start
    # every decoder parameter of the same name and shape; the rest (e.g. the sequence input)
    # start fresh. A fresh decoder spends most of a small budget relearning
    # the backbone that stage 1 already decodes (BENCHMARKS.md, issue 20).
    decoder_init: str = ""
    data_dir: str = ""  # folder with index.jsonl; '' = ../shared/data/structures
    max_train_chains: int = 0  # 0 = all
    max_valid_chains: int = 0  # the evaluated chains (for eval_split train, default: the training chains)
    max_chain_length: int = 0  # > 0: chains longer than this are left out (not cropped), both splits
    # The split the run evaluates at the end. "train" scores the chains it trained on: the
    # overfit check (configs/vqvae_overfit.yaml), and the only choice for a data folder
    # without an index.jsonl, which has no valid split.
    eval_split: str = "valid"
    crop_length: int = 128
    batch_size: int = 8
    steps: int = 1000
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip_norm: float = 1.0
    seed: int = 0
    output_dir: str = "runs/vqvae"
    log_every: int = 10
    checkpoint_every: int = 500
    # Steps during which the decoder reads the continuous encoder output (no quantisation); the
    # codebook is then fitted to the encoder's outputs. Keeps a codebook fitted to an untrained
    # encoder from collapsing onto a handful of codes.
    vq_warmup_steps: int = 0
    eval_max_length: int = 512
    loss_weights: LossWeights = dataclasses.field(default_factory=LossWeights)
    distance_clamp: float = DISTANCE_CLAMP  # Å^2, on the backbone distance loss's squared errors
    direction_clamp: float = DIRECTION_CLAMP
    # Å, on each FAPE error (AlphaFold 2's 10 Å). Clamped, FAPE has no gradient for pairs off by
    # more than this, which early in training is every non-local pair: the global fold (and so its
    # handedness) is then set by the achiral distance loss alone, and a share of chains settles
    # into the mirror image, which no later local term undoes (BENCHMARKS.md, issue 20).
    fape_clamp: float = 10.0
    # Stage 2 sub-stages 2B/2C (ESM3_SPEC 5.4): an esm3-jax ESM3 checkpoint whose structure
    # predictions from the sequence alone replace the encoder's tokens in a random fraction of
    # the samples, so that the decoder and its confidence heads see ESM3's outputs.
    esm3_checkpoint: str = ""
    esm3_token_probability: float = 0.5

    def validate(self) -> None:
        if self.distance_clamp <= 0 or self.direction_clamp <= 0 or self.fape_clamp <= 0:
            raise ValueError("train.distance_clamp, train.direction_clamp and train.fape_clamp must be positive")
        if self.eval_split not in ("train", "valid"):
            raise ValueError(f"train.eval_split must be train or valid, got {self.eval_split!r}")
        if self.max_chain_length < 0 or self.max_train_chains < 0 or self.max_valid_chains < 0:
            raise ValueError("train.max_chain_length, max_train_chains and max_valid_chains must be >= 0")
        if self.stage not in (1, 2):
            raise ValueError(f"train.stage must be 1 or 2, got {self.stage}")
        if self.stage == 2 and not self.encoder_checkpoint:
            raise ValueError("train.stage 2 trains a decoder for a frozen encoder: set train.encoder_checkpoint")
        if self.decoder_init and self.stage != 2:
            raise ValueError("train.decoder_init starts a stage-2 decoder from another decoder's weights: a stage-2 option")
        if self.esm3_checkpoint and self.stage != 2:
            raise ValueError("train.esm3_checkpoint (ESM3-predicted tokens) is a stage-2 option")
        if not 0.0 <= self.esm3_token_probability <= 1.0:
            raise ValueError(f"train.esm3_token_probability must be in [0, 1], got {self.esm3_token_probability}")
        for name in ("crop_length", "batch_size", "steps", "log_every", "checkpoint_every", "eval_max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.stage == 1 and not 0 <= self.vq_warmup_steps < self.steps:
            # The codebook is fitted to the encoder at the end of the warm-up: a run that ends
            # before it would export codes fitted to the untrained encoder.
            raise ValueError(f"train.vq_warmup_steps={self.vq_warmup_steps} must be in [0, train.steps={self.steps})")
        self.loss_weights.validate()


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    train: VQVAETrainSettings = dataclasses.field(default_factory=VQVAETrainSettings)

    def validate(self) -> None:
        self.encoder.validate()
        self.decoder.validate()
        self.train.validate()


def load_vqvae_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> VQVAEConfig:
    return load_config_file(VQVAEConfig, path, overrides)
