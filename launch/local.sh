#!/usr/bin/env bash
# Train the tiny ESM3 on the bundled demo data, on this machine (CPU or one GPU).
#
#   launch/local.sh                      # preprocess demo_data/ (once), then train configs/tiny.yaml
#   launch/local.sh train.steps=50       # any config overrides are passed on to `esm3-jax train`
#   CONFIG=configs/small.yaml launch/local.sh
#
# Re-running resumes from the latest checkpoint in train.output_dir (runs/tiny by default);
# Ctrl-C or SIGTERM saves a checkpoint first. TensorBoard: tensorboard --logdir runs/tiny/tensorboard
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/tiny.yaml}
RECORDS=runs/demo_records

# XLA:CPU steps run ~1.6x faster under tcmalloc (esm3_jax/runtime/allocator.py), which esm3-jax uses when
# installed. On Debian/Ubuntu as root, install it; elsewhere say how.
if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing tcmalloc (apt-get install libtcmalloc-minimal4) for faster CPU steps..."
    (apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4) >/dev/null 2>&1 \
      || echo "  could not install it; continuing with the system allocator (slower on the CPU)"
  else
    echo "note: install tcmalloc (e.g. apt-get install libtcmalloc-minimal4) for ~1.6x faster CPU steps"
  fi
fi

# The demo records: sidechainnet chains (sequence + DSSP) and PDB files, as ArrayRecord shards.
# `preprocess` skips shards that are already complete, so this is cheap after the first run.
if [ ! -f "$RECORDS/train/manifest.json" ]; then
  esm3-jax preprocess demo_data/pdb_chains_train.jsonl.gz demo_data/structures -o "$RECORDS/train"
fi
if [ ! -f "$RECORDS/valid/manifest.json" ]; then
  esm3-jax preprocess demo_data/pdb_chains_valid.jsonl.gz -o "$RECORDS/valid"
fi

# One process. With no GPU or TPU here, use the CPU backend explicitly, so that an installed libtpu
# (e.g. for `esm3-jax aot`) is not probed for chips that do not exist.
if [ -z "${JAX_PLATFORMS:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1 \
    && ! ls /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1; then
  export JAX_PLATFORMS=cpu
fi
exec esm3-jax train --config "$CONFIG" "$@"
