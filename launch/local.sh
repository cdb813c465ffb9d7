#!/usr/bin/env bash
# The whole loop on the bundled demo data, on this machine (CPU or one GPU), in about 15 minutes on
# 2 CPU cores: cluster split -> structure tokenizer -> records -> train -> evaluate -> fold ->
# inverse-fold -> a summary of where everything went. Everything is written under runs/demo/.
#
#   launch/local.sh                      # configs/demo.yaml
#   launch/local.sh train.steps=2000     # any config overrides are passed on to `esm3-jax train`
#   CONFIG=configs/small.yaml launch/local.sh
#
# Re-running skips the steps already done (split, tokenizer, records) and resumes training from the
# latest checkpoint in train.output_dir; evaluation, folding and inverse folding run again.
# Ctrl-C or SIGTERM during training saves a checkpoint first.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/demo.yaml}
VQVAE_CONFIG=${VQVAE_CONFIG:-configs/vqvae_demo.yaml}
DEMO=runs/demo
SPLIT=$DEMO/split
RECORDS=$DEMO/records
VQVAE=$DEMO/vqvae
# The split's seed: with seed 2 the held-out clusters include two of the nine clusters of
# demo_data/structures (zinc fingers 1znm and 5znf), so that folding and inverse folding have a
# held-out chain with a known structure.
SPLIT_SEED=2

apt_install() {  # apt_install PACKAGE WHY: as root on Debian/Ubuntu install it, elsewhere say how
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing $1 (apt-get install $1) $2..."
    (apt-get update -qq && apt-get install -y -qq "$1") >/dev/null 2>&1 || echo "  could not install $1"
  else
    echo "note: install $1 (e.g. sudo apt-get install $1, or conda) $2"
  fi
}
# XLA:CPU steps run ~1.6x faster under tcmalloc (esm3_jax/runtime/allocator.py), which esm3-jax uses when
# installed.
if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc; then
  apt_install libtcmalloc-minimal4 "for faster CPU steps"
fi
# MMseqs2 clusters the sequences for the split (`esm3-jax split`).
if ! command -v mmseqs >/dev/null 2>&1; then
  apt_install mmseqs2 "for the sequence-cluster split"
  command -v mmseqs >/dev/null 2>&1 || { echo "mmseqs (MMseqs2) is needed: apt-get install mmseqs2, or conda install -c bioconda mmseqs2" >&2; exit 1; }
fi

# One process. With no GPU or TPU here, use the CPU backend explicitly, so that an installed libtpu
# (e.g. for `esm3-jax aot`) is not probed for chips that do not exist.
if [ -z "${JAX_PLATFORMS:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1 \
    && ! ls /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1; then
  export JAX_PLATFORMS=cpu
fi
SECONDS=0
step() { echo; echo "=== [$((SECONDS / 60))m$((SECONDS % 60))s] $*"; }

# 1. Held-out data by sequence clusters: the sidechainnet chains (sequence + DSSP) and the
# sequences of demo_data/structures' chains are clustered together with MMseqs2 (30 % identity),
# and whole clusters go to train / valid / test.
if [ ! -f "$SPLIT/split.json" ]; then
  step "split: MMseqs2 clusters -> $SPLIT"
  esm3-jax split demo_data/pdb_chains_train.jsonl.gz demo_data/pdb_chains_valid.jsonl.gz \
    demo_data/structures/sequences.fasta -o "$SPLIT" --seed "$SPLIT_SEED"
fi
# Each split's structure files, chosen by the ids of its sequences.fasta (FILE chain=C headers).
structure_rows() {  # structure_rows SPLIT: "FILE CHAIN" per chain of that split
  awk '/^>/ { sub(/^>/, "", $1); sub(/^chain=/, "", $2); print "demo_data/structures/" $1 ".pdb.gz", $2 }' \
    "$SPLIT/$1/sequences.fasta"
}
# The structure tokenizer's index: its "valid" chains are the held-out (valid + test) ones.
mkdir -p "$SPLIT/structures"
{ structure_rows train | awk -v d="$PWD" '{ printf "{\"file\": \"%s/%s\", \"chain\": \"%s\", \"split\": \"train\"}\n", d, $1, $2 }'
  { structure_rows valid; structure_rows test; } \
    | awk -v d="$PWD" '{ printf "{\"file\": \"%s/%s\", \"chain\": \"%s\", \"split\": \"valid\"}\n", d, $1, $2 }'
} > "$SPLIT/structures/index.jsonl"

# 2. A small structure tokenizer (VQ-VAE) trained on the training chains of demo_data/structures:
# its encoder gives the training structures their tokens, its decoder turns folded tokens back into
# coordinates. There is no pretrained decoder here (nothing is downloaded); it is the demo's own.
if [ ! -f "$VQVAE/eval.json" ]; then
  step "train-vqvae: the demo's structure tokenizer -> $VQVAE"
  esm3-jax train-vqvae --config "$VQVAE_CONFIG" "train.data_dir=$SPLIT/structures" "train.output_dir=$VQVAE"
fi

# 3. ArrayRecord shards. `preprocess` skips shards that are already complete.
for split in train valid test; do
  if [ ! -f "$RECORDS/$split/manifest.json" ]; then
    step "preprocess: $split split -> $RECORDS/$split"
    esm3-jax preprocess "$SPLIT/$split/pdb_chains_train.jsonl" "$SPLIT/$split/pdb_chains_valid.jsonl" \
      -o "$RECORDS/$split"
  fi
done
if [ ! -f "$RECORDS/train_structures/manifest.json" ]; then
  step "preprocess: training structures (+ structure tokens) -> $RECORDS/train_structures"
  # shellcheck disable=SC2046
  esm3-jax preprocess $(structure_rows train | cut -d' ' -f1 | sort -u) \
    --structure-encoder "$VQVAE/encoder" -o "$RECORDS/train_structures"
fi

# 4. Train (resumes from the latest checkpoint).
OUTPUT_DIR=$(awk '/^ *output_dir:/ { print $2 }' "$CONFIG")
for arg in "$@"; do case "$arg" in train.output_dir=*) OUTPUT_DIR=${arg#train.output_dir=} ;; esac; done
step "train: $CONFIG -> $OUTPUT_DIR"
esm3-jax train --config "$CONFIG" "$@"

# 5. Held-out NLL, beside each track's unigram entropy (what a model that learned only the token
# frequencies would score), at the training noise and under conditioning.
step "evaluate on the held-out test split -> $DEMO/eval_test.json"
esm3-jax evaluate --checkpoint "$OUTPUT_DIR" --data "$RECORDS/test" --json "$DEMO/eval_test.json"

# 6. Fold and inverse-fold one held-out chain with a known structure.
read -r HELD_FILE HELD_CHAIN < <({ structure_rows test; structure_rows valid; } | head -n 1)
HELD_NAME=$(basename "$HELD_FILE" .pdb.gz)
awk -v id="$HELD_NAME" '/^>/ { keep = (substr($1, 2) == id) } keep' \
  "$SPLIT/test/sequences.fasta" "$SPLIT/valid/sequences.fasta" > "$DEMO/heldout.fasta"
step "fold: the held-out $HELD_NAME's sequence -> $DEMO/fold/"
esm3-jax fold --checkpoint "$OUTPUT_DIR" --decoder "$VQVAE/decoder" --fasta "$DEMO/heldout.fasta" \
  --native "$HELD_FILE" --chain "$HELD_CHAIN" --out-dir "$DEMO/fold"
step "inverse-fold: the held-out $HELD_NAME's backbone -> $DEMO/inverse_fold.fasta"
esm3-jax inverse-fold --checkpoint "$OUTPUT_DIR" --structure "$HELD_FILE" --chain "$HELD_CHAIN" \
  --num-samples 8 --out "$DEMO/inverse_fold.fasta"

step "done in $((SECONDS / 60))m$((SECONDS % 60))s"
# The summary reads only JSON and FASTA files: any python3 will do.
python3 - "$DEMO" "$OUTPUT_DIR" "$HELD_NAME" "$VQVAE" "$RECORDS" "$SPLIT" <<'EOF'
import json, sys
demo, run, held, vqvae, records, split = sys.argv[1:]
ev = json.load(open(f"{demo}/eval_test.json"))
fmt = lambda v: "-" if v is None else f"{v:.3f}"
print("held-out test split, nats per position (unigram: the split's own token-frequency entropy):")
for r in ev["training_noise"]:
    if r.get("nll") is not None:
        print(f"  {r['target']:<9} at the training noise: NLL {fmt(r['nll'])}  (unigram {fmt(r['unigram_nll'])})")
cond = {(r["target"], r["given"]): r for r in ev["conditioning"]}
for target, givens in (("sequence", ("nothing", "ss8")), ("ss8", ("nothing", "sequence"))):
    for given in givens:
        r = cond.get((target, given), {})
        label = f"{target} fully masked, given {given}:"
        print(f"  {label:<38} NLL {fmt(r.get('nll'))}  (unigram {fmt(r.get('unigram_nll'))})")
fold = json.load(open(f"{demo}/fold/summary.json"))
p = fold["proteins"][0]
print(f"fold of held-out {held} ({p['length']} residues) against its native structure: backbone RMSD "
      f"{p['backbone_rmsd']:.2f} A, LDDT-CA {p['lddt_ca']:.3f}, TM-score {p['tm_score']:.3f}")
rec = [float(l.split("recovery=")[1].split()[0]) for l in open(f"{demo}/inverse_fold.fasta") if "recovery=" in l]
if rec:
    print(f"inverse-fold of held-out {held}: {len(rec)} designs, mean sequence recovery {sum(rec) / len(rec):.3f}")
print(f"""
where everything went:
  {split}/             train/valid/test inputs by MMseqs2 clusters (split.json, clusters.tsv)
  {vqvae}/             the demo's structure tokenizer: encoder/, decoder/, eval.json (held-out decoding RMSD),
                          metrics.csv. It is a small stage-1 VQ-VAE trained on ~20 chains for a few minutes,
                          not the released ESM3 decoder: folds decoded by it are rough, and its pLDDT and pTM
                          heads are untrained (stage 2 trains them), so the pLDDT and pTM that fold prints
                          mean nothing here. For real folding, convert the released weights (README, "The
                          structure tokenizer").
  {records}/           ArrayRecord shards: train, train_structures, valid, test (manifest.json, rejects.jsonl)
  {run}/           checkpoints/, tensorboard/, metrics (esm3-jax checkpoint-info {run})
  {demo}/eval_test.json   the held-out evaluation tables
  {demo}/fold/            {held}.pdb (pLDDT x 100 in the B-factors), structure_tokens.npz, summary.json
  {demo}/inverse_fold.fasta  8 designed sequences with their recovery""")
EOF
