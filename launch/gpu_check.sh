#!/usr/bin/env bash
# One prepared GPU check, for a short slot on one NVIDIA GPU (H100/H200) with no network:
#
#   bash launch/gpu_check.sh OUTDIR            # on the GPU machine, from a copy of this repository
#   bash launch/gpu_check.sh OUTDIR --dry-run  # the same code on the CPU, tiny shapes (a test runs this)
#
# It uses the python, JAX (with CUDA) and torch it finds (PYTHON=... to pick another interpreter),
# imports esm3_jax from this checkout (no install), and takes any other package the check imports
# (flax, optax, esm, ...) from launch/gpu_wheels/ when the interpreter lacks it (README: how to
# fill that folder). In at most ~8 minutes it writes, as JSON in OUTDIR:
#   matmul.json      the card's bf16 matmul rate through XLA
#   train-step.json  the 1.4B config's train step at length 2048, bf16, cuDNN attention, the
#                    first (remat, batch) that fits: tokens/s and MFU vs that rate and the datasheet
#   reference.json   forward pass and batch generation vs the reference `esm` ESM3 on the same GPU
#                    (the reference in bf16 autocast)
#   summary.json     the headline numbers of the three
# Each stage is its own process under its own time limit, so one that fails or overruns still
# leaves the others' results (and its own error) behind. Exit status: 0 when all three succeeded.
set -uo pipefail
OUT=${1:?usage: launch/gpu_check.sh OUTDIR [--dry-run]}
shift
DRY=""
if [ "${1:-}" = "--dry-run" ]; then DRY="--dry-run"; shift; fi
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

if ! "$PY" -c "import jax" 2>/dev/null; then
  echo "gpu_check: $PY cannot import jax; point PYTHON at the interpreter that has JAX (and torch)" >&2
  exit 2
fi

# Packages the check imports that the interpreter lacks: installed (no deps, no index) from the
# wheel folder into a scratch directory put on the path. Only the missing ones, so that the
# machine's own JAX, numpy and torch are what runs.
WHEELS="$REPO/launch/gpu_wheels"
SITE="$OUT/.site-packages"
missing=$("$PY" - "$REPO/launch/gpu_wheels.txt" <<'EOF'
import importlib.util, sys
rows = [line.split() for line in open(sys.argv[1]) if line.strip() and not line.startswith("#")]
print(" ".join(dist for mod, dist in rows if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "gpu_check: not importable here: $missing; installing them from $WHEELS"
  for dist in $missing; do
    "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" --target "$SITE" "$dist" 2>/dev/null \
      || echo "gpu_check: no wheel for $dist in $WHEELS (README: 'The GPU check'); the stages that import it will fail"
  done
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export DISABLE_ITERATIVE_SAMPLING_TQDM=1
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
# Compiled programs are cached in OUTDIR: a second run in the same slot skips the compiles.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/.jax_cache}
if [ -n "$DRY" ]; then
  export JAX_PLATFORMS=cpu
  T_MATMUL=${T_MATMUL:-300} T_TRAIN=${T_TRAIN:-600} T_REF=${T_REF:-600}  # a loaded 2-core CI machine compiles slowly
else
  T_MATMUL=${T_MATMUL:-40} T_TRAIN=${T_TRAIN:-190} T_REF=${T_REF:-230}  # 460 s in all
fi

status=0
run_stage() {  # STAGE SECONDS [env...]
  local stage=$1 limit=$2
  shift 2
  echo "gpu_check: stage $stage (at most ${limit} s)"
  rm -f "$OUT/$stage.json"
  env "$@" timeout --signal=TERM --kill-after=10 "$limit" "$PY" -m esm3_jax.bench.gpu_check "$stage" "$OUT" $DRY \
    > "$OUT/$stage.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    status=1
    if [ ! -f "$OUT/$stage.json" ] || [ $rc -ge 124 ]; then
      printf '{"stage": "%s", "ok": false, "error": "exit status %s (124: over its %s s limit); see %s.log"}\n' \
        "$stage" "$rc" "$limit" "$stage" > "$OUT/$stage.json"
    fi
  fi
  tail -n 3 "$OUT/$stage.log"
}
# The train step may take most of the card's memory; the reference stage shares it between JAX
# and torch, so JAX allocates on demand there.
run_stage matmul "$T_MATMUL"
run_stage train-step "$T_TRAIN" XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
run_stage reference "$T_REF" XLA_PYTHON_CLIENT_PREALLOCATE=false

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
stages = {s: json.loads((out / f"{s}.json").read_text()) for s in ("matmul", "train-step", "reference")
          if (out / f"{s}.json").is_file()}
pick = lambda d, *keys: {k: d.get(k) for k in keys}
res = {s: r.get("result", {}) for s, r in stages.items()}
summary = {
    "ok": {s: r.get("ok", False) for s, r in stages.items()},
    "environment": stages.get("matmul", {}).get("environment"),
    "matmul": pick(res.get("matmul", {}), "bf16_matmul_flops", "datasheet_bf16_flops", "device_kind"),
    "train_step": pick(res.get("train-step", {}), "config", "batch", "length", "step_s", "tokens_per_s",
                       "mfu_vs_measured_matmul", "mfu_vs_datasheet", "attention", "cudnn_attention_calls"),
    "forward": pick(res.get("reference", {}).get("forward", {}), "jax_tokens_per_s", "reference_tokens_per_s", "speedup"),
    "generate": pick(res.get("reference", {}).get("generate", {}), "jax_proteins_per_s", "reference_proteins_per_s", "speedup"),
    "errors": {s: r["error"] for s, r in stages.items() if r.get("error")},
}
(out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
print(json.dumps(summary, indent=2, default=str))
EOF
exit $status
