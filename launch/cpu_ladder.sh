#!/usr/bin/env bash
# The CPU scaling ladder on real data, from the raw files to the fit, with one command:
#
#   launch/cpu_ladder.sh                    # data under runs/ladder/, the ladder in runs/ladder/out
#   LADDER_DIR=/scratch/ladder launch/cpu_ladder.sh
#   DATA=/path/to/shared/data/sequences launch/cpu_ladder.sh
#
# 1. split: SCOPe 2.07 domains (all 93,164), every 4th sidechainnet PDB chain (39,740) and the
#    20,000 UniProt sequences of mmseqs2-examples, clustered by MMseqs2 easy-cluster at 30 %
#    identity and 80 % coverage; whole clusters to train/valid/test (0.90/0.05/0.05 of clusters).
# 2. preprocess: the train and valid copies to ArrayRecord shards (sequence, and SS8 where DSSP has it).
# 3. scaling: configs/scaling/cpu_ladder.yaml (LADDER=... for another), held out on valid.
# Each step is skipped when its output is complete, and the ladder resumes where it stopped (a
# finished size is not rerun), so rerunning after an interruption continues the run.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/sequences}
LADDER_DIR=${LADDER_DIR:-runs/ladder}
LADDER=${LADDER:-configs/scaling/cpu_ladder.yaml}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
ESM3=${ESM3:-esm3-jax}

for f in pdb_chains_seq_dssp8.sidechainnet.jsonl.gz scope_domains_seq_dssp8.sidechainnet.jsonl.gz \
         uniprot_mmseqs2_example_DB.fasta.gz; do
  [ -f "$DATA/$f" ] || { echo "missing $DATA/$f (set DATA=the shared data's sequences/ folder)" >&2; exit 2; }
done
mkdir -p "$LADDER_DIR/src"
if [ ! -f "$LADDER_DIR/splits/split.json" ]; then
  # A quarter of the PDB chains (every 4th line, so every part of the file): the PDB is highly
  # redundant, and the ladder reads at most ~10M tokens; MMseqs2 on all 159k chains takes much longer.
  zcat "$DATA/pdb_chains_seq_dssp8.sidechainnet.jsonl.gz" | awk 'NR % 4 == 1' > "$LADDER_DIR/src/pdb_every4th.jsonl"
  $ESM3 split "$LADDER_DIR/src/pdb_every4th.jsonl" "$DATA/scope_domains_seq_dssp8.sidechainnet.jsonl.gz" \
    "$DATA/uniprot_mmseqs2_example_DB.fasta.gz" -o "$LADDER_DIR/splits" --identity 0.3 --coverage 0.8 \
    --fractions 0.9 0.05 0.05 --seed 0
fi
for split in train valid; do
  if [ ! -f "$LADDER_DIR/records/$split/manifest.json" ]; then
    $ESM3 preprocess "$LADDER_DIR/splits/$split/"* -o "$LADDER_DIR/records/$split" --no-progress
  fi
done
exec $ESM3 scaling --ladder "$LADDER" --train-data "$LADDER_DIR/records/train" \
  --valid-data "$LADDER_DIR/records/valid" --out "$LADDER_DIR/out"
