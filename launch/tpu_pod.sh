#!/usr/bin/env bash
# Pretrain on a Cloud TPU pod slice: the same command runs on every host of the slice.
#
#   TPU=my-v5p-512 ZONE=us-east5-a CONFIG=configs/esm3_7b.yaml \
#     launch/tpu_pod.sh train.output_dir=gs://my-bucket/esm3-7b data.datasets='[{path: gs://my-bucket/records}]'
#
# Before a big run, check that it fits without a TPU (on any machine with `pip install libtpu`):
#   JAX_PLATFORMS=cpu esm3-jax aot --config configs/esm3_7b.yaml    # the slice it names: mesh.topology
#
# How it works:
# - `gcloud ... ssh --worker=all` starts one process per TPU VM host. Each process calls
#   jax.distributed.initialize() with no arguments (ESM3_JAX_AUTO_DISTRIBUTED=1): on Cloud TPU,
#   JAX finds the coordinator, the number of hosts and its own rank from the TPU metadata.
# - Every host reads its own disjoint slice of each dataset (Grain, process_index::process_count)
#   and contributes its rows of the global batch; data.batch_size is the global batch.
# - Checkpoints (Orbax) and TensorBoard logs go to train.output_dir; use a gs:// bucket so all
#   hosts see the same folder. Re-running the same command resumes from the latest checkpoint.
# - Preemption: a spot/preemptible slice gets SIGTERM; every host finishes its step, they save
#   together, and exit 0. Re-run this script on the new slice to continue (also on a different
#   slice shape: the state is resharded onto the new mesh on restore).
# - Mesh: set mesh.fsdp / mesh.tensor in the config; mesh.data=-1 takes the remaining chips.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
CONFIG=${CONFIG:-configs/esm3_open_1.4b.yaml}
REPO_DIR=${REPO_DIR:-esm3-jax}  # where the repository is checked out on every host

# Quote each override so that YAML in it (lists, braces) survives the remote shell.
ARGS=""
for a in "$@"; do ARGS+=" $(printf '%q' "$a")"; done

gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  cd $REPO_DIR
  . .venv/bin/activate 2>/dev/null || true
  export ESM3_JAX_AUTO_DISTRIBUTED=1
  # Let XLA overlap FSDP all-gathers / reduce-scatters with compute.
  export LIBTPU_INIT_ARGS='--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true --xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true'
  esm3-jax train --config $CONFIG $ARGS
"
