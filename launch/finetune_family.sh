#!/usr/bin/env bash
# Fine-tuning on one protein family, measured: does held-out NLL drop more on the family than on
# other families? (BENCHMARKS.md, "Fine-tuning on one protein family".)
#
#   launch/finetune_family.sh                 # everything below, into runs/finetune_family
#   OUT=/tmp/ff FAMILY=b.1.1.1 launch/finetune_family.sh
#
# 1. pretrain the tiny ESM3 (configs/tiny.yaml) on the demo PDB chains (launch/local.sh's records);
# 2. from the SCOPe 2.07 domains in ../shared/data (SIDECHAINNET's sequence + DSSP8 + sccs), take
#    the family FAMILY (default b.1.1.1, immunoglobulin V-set domains: ~840 distinct sequences),
#    split it by MMseqs2 clusters at 90% identity (`esm3-jax split`: no held-out member is >= 90%
#    identical to a fine-tuning one), and a sample of domains from other folds as the control;
# 3. fine-tune the pretrained model on the family's training clusters, twice: every parameter
#    (configs/finetune_tiny.yaml with train.trainable=[]) and LoRA adapters only
#    (configs/finetune_tiny_lora.yaml);
# 4. `esm3-jax evaluate` each of the three models on the family's held-out members and on the other
#    families (same seed: the same crops and masks for every model), and print the NLL table.
# Every stage is skipped when its output exists, so a re-run only redoes what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/finetune_family}
FAMILY=${FAMILY:-b.1.1.1}
DATA=${DATA:-../shared/data}
RECORDS=${RECORDS:-$OUT/demo_records}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-600}
FINETUNE_STEPS=${FINETUNE_STEPS:-200}
EVAL_BATCHES=${EVAL_BATCHES:-8}
ESM3=${ESM3:-esm3-jax}
SCOPE="$DATA/sequences/scope_domains_seq_dssp8.sidechainnet.jsonl.gz"
[ -f "$SCOPE" ] || { echo "no $SCOPE: set DATA to the shared data folder"; exit 2; }
if [ -z "${JAX_PLATFORMS:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1 \
    && ! ls /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1; then
  export JAX_PLATFORMS=cpu
fi
mkdir -p "$OUT"
quiet="train.progress_bar=false"

# 1. The demo records and the pretrained model.
[ -f "$RECORDS/train/manifest.json" ] || $ESM3 preprocess demo_data/pdb_chains_train.jsonl.gz demo_data/structures -o "$RECORDS/train" --no-progress
[ -f "$RECORDS/valid/manifest.json" ] || $ESM3 preprocess demo_data/pdb_chains_valid.jsonl.gz -o "$RECORDS/valid" --no-progress
$ESM3 train --config configs/tiny.yaml train.output_dir="$OUT/pretrain" train.steps="$PRETRAIN_STEPS" \
  "data.datasets=[{path: $RECORDS/train}]" "train.eval_datasets=[{path: $RECORDS/valid}]" $quiet

# 2. The family (distinct sequences) and the control: up to 400 distinct domains of other folds
#    (the first sccs letter + number differ from FAMILY's), drawn with a fixed seed.
if [ ! -f "$OUT/others.jsonl" ]; then
  python3 - "$SCOPE" "$FAMILY" "$OUT" <<'EOF'
import gzip, json, random, sys
scope, family, out = sys.argv[1:]
fold = ".".join(family.split(".")[:2])
fam, other, seen = [], [], set()
for line in gzip.open(scope, "rt"):
    r = json.loads(line)
    if r["seq"] in seen:
        continue
    seen.add(r["seq"])
    if r["sccs"] == family:
        fam.append(r)
    elif not r["sccs"].startswith(fold + "."):
        other.append(r)
random.Random(0).shuffle(other)
for name, rows in (("family", fam), ("others", other[:400])):
    with open(f"{out}/{name}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
print(f"{family}: {len(fam)} distinct sequences; control: {min(400, len(other))} domains of other folds")
EOF
fi
[ -f "$OUT/family_split/split.json" ] || $ESM3 split "$OUT/family.jsonl" -o "$OUT/family_split" \
  --identity 0.9 --fractions 0.8 0 0.2
for part in train test; do
  [ -f "$OUT/records/family_$part/manifest.json" ] || \
    $ESM3 preprocess "$OUT/family_split/$part/family.jsonl" -o "$OUT/records/family_$part" --no-progress
done
[ -f "$OUT/records/others/manifest.json" ] || $ESM3 preprocess "$OUT/others.jsonl" -o "$OUT/records/others" --no-progress

# 3. Fine-tune: all parameters, then LoRA adapters only. The family's own test split is not looked
#    at during training (no eval_datasets).
common=(train.init_from="$OUT/pretrain" train.steps="$FINETUNE_STEPS" train.warmup_steps=10
        "data.datasets=[{path: $OUT/records/family_train}]" train.eval_every=0 "train.eval_datasets=[]" $quiet)
$ESM3 train --config configs/finetune_tiny.yaml train.output_dir="$OUT/full" "train.trainable=[]" "${common[@]}"
$ESM3 train --config configs/finetune_tiny_lora.yaml train.output_dir="$OUT/lora" "${common[@]}"

# 4. Held-out NLL: every model on the family's test clusters and on the other folds.
for model in pretrain full lora; do
  for split in family_test others; do
    json="$OUT/eval/${model}_${split}.json"
    [ -f "$json" ] && continue
    mkdir -p "$OUT/eval"
    $ESM3 evaluate --checkpoint "$OUT/$model" --data "$OUT/records/$split" --config configs/tiny.yaml \
      --batches "$EVAL_BATCHES" --json "$json" --no-progress > "$OUT/eval/${model}_${split}.txt"
  done
done
python3 - "$OUT" "$FAMILY" <<'EOF'
import json, sys
out, family = sys.argv[1:]
def nll(model, split, track):
    r = json.load(open(f"{out}/eval/{model}_{split}.json"))
    return next(x for x in r["training_noise"] if x["target"] == track)["nll"]
for track in ("sequence", "ss8"):
    print(f"\n{track} NLL (nats per masked position, at the training noise)")
    print(f"{'model':<10} {family + ' held-out':>18} {'other folds':>12} {'family drop':>12} {'others drop':>12}")
    base = {s: nll("pretrain", s, track) for s in ("family_test", "others")}
    for model in ("pretrain", "full", "lora"):
        f, o = nll(model, "family_test", track), nll(model, "others", track)
        print(f"{model:<10} {f:>18.4f} {o:>12.4f} {base['family_test'] - f:>12.4f} {base['others'] - o:>12.4f}")
EOF
