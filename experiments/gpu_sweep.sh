#!/usr/bin/env bash
# docs/experiments.md section 14: the GPU sweep (validation only; the test split is not read):
# full fine-tuning of the `transfer` base with layer-wise learning rates, and EMA weights, against
# the shipped `transfer` recipe trained in the same run. Three seeds each; each seed is also paired
# with the equalised `cnn` of the same seed, as the shipped `ensemble` pairs them.
#
#   bash experiments/gpu_sweep.sh DATA CNN_RUNS OUT [SEEDS] [EXTRA_SET...]
#
# DATA holds train/{NORMAL,PNEUMONIA}; CNN_RUNS holds cnn-s0, cnn-s1... (experiments/ensembles.py's
# layout); OUT gets sweep.log (everything), results.jsonl (ensembles.py's rows, one "variant" key
# added), runs.jsonl (per run: validation AUC, best epoch, wall time) and, for the fine-tuned
# variants, each seed-0 model (weights, guard, model.json) as VARIANT-s0.tgz.
# EXTRA_SET (e.g. max_steps=2) is added to every variant: a smoke test of the script on a CPU.
set -u
data=$1 cnn=$2 out=$3 seeds=${4:-0,1,2}
shift $(($# < 4 ? $# : 4))
extra=()
for change in "$@"; do extra+=(--set "$change"); done
runs=$(mktemp -d)
here=$(cd "$(dirname "$0")" && pwd)
full=(--set model_args.trainable_blocks=7 --set feature_views=0)

variant() {
    local name=$1
    shift
    echo "=== $name: $* ${extra[*]}" | tee -a "$out/sweep.log"
    python "$here/ensembles.py" --data "$data" --runs "$runs/$name" --seeds "$seeds" \
        --families "transfer,cnn=$cnn" "$@" "${extra[@]}" 2>&1 | tee -a "$out/sweep.log" |
        grep '^{"candidate"' | python -c '
import json, sys
for line in sys.stdin:
    print(json.dumps({"variant": sys.argv[1], **json.loads(line)}))' "$name" >>"$out/results.jsonl"
    python - "$name" "$runs/$name" >>"$out/runs.jsonl" <<'EOF'
import json, sys
from pathlib import Path
for meta in sorted(Path(sys.argv[2]).glob("*/model.json")):
    m = json.loads(meta.read_text())
    t = m["training"]
    print(json.dumps({"variant": sys.argv[1], "run": meta.parent.name,
                      "val_auc": m["validation"]["auc"], "best_epoch": t["best_epoch"],
                      "epochs_run": t["epochs_run"], "wall_s": t["wall_time_s"],
                      "device": t["device"]}))
EOF
}

keep() {  # a variant's seed-0 model, without its checkpoint and ONNX graph
    tar -C "$runs/$1/transfer-s0" -czf "$out/$1-s0.tgz" model.json weights.safetensors \
        guard.safetensors
}

# Most telling first: a command that runs out of time still returns what finished.
# $VARIANTS (e.g. "ema ft07") runs only those.
wanted() { [[ -z ${VARIANTS:-} || " $VARIANTS " == *" $1 "* ]]; }
wanted ft05 && variant ft05 "${full[@]}" --set lr_decay=0.5 && keep ft05
wanted shipped && variant shipped
wanted ft07 && variant ft07 "${full[@]}" --set lr_decay=0.7 && keep ft07
wanted ema && variant ema --set ema=0.995
echo "=== done" | tee -a "$out/sweep.log"
