#!/usr/bin/env bash
# What pretraining with this project is worth downstream at CPU scale: the README's pretraining-gain table.
#
#   PROBE_DATA=/data/probe bash bench/pretraining_gain.sh [OUT]        (OUT default: outputs/gain)
#
# PROBE_DATA holds {en,zh,ko}_sentiment/{train,dev}.jsonl (the full labelled sets the bundled 400/200-row slices
# come from; sources in pretrain/probe/samples/README.md) and ko_reviews_unlabelled.txt (unlabelled Korean movie
# reviews, no text shared with ko_sentiment). KO_GENERAL (optional) is general Korean text for the starting model of
# the continued-pretraining row (e.g. the LibreOffice help pages as plain text); without it that row is left out.
#
# For each language a quickstart-size model (conf/model/tiny.yaml) is pretrained from scratch for STEPS steps
# (default 2400: 4.9M tokens, about 12 minutes on a quiet 2-core CPU) on in-domain text without labels: en and zh on
# their task's training texts (task-adaptive pretraining), ko on the unlabelled reviews. Its checkpoints at 1/8,
# 1/4, 1/2 and all of STEPS and a random initialisation of the same architecture are then fine-tuned on the bundled
# 400-row training slice and scored on the full dev set, 3 seeds each (the probe's default recipe). Korean also
# gets a starting model pretrained on KO_GENERAL for STEPS/2 steps and its continuation on the reviews for STEPS/2.
# Every step resumes: re-running the script skips finished runs and finished probe cells.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PROBE_DATA:?set PROBE_DATA to the folder with {en,zh,ko}_sentiment/ and ko_reviews_unlabelled.txt}"
OUT=${1:-outputs/gain}
STEPS=${STEPS:-2400}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a tiny model: one thread per process is as fast, and two runs share 2 cores
mkdir -p "$OUT/text" "$OUT/tasks" "$OUT/runs"

texts_of() {  # the training texts of a task, one per line, labels dropped
  $PY -c 'import json,sys; [print(json.loads(l)["text"].replace("\n", " ")) for l in open(sys.argv[1], encoding="utf-8")]' "$1"
}

prepare() {  # prepare NAME LANG INPUT... : a 4000-piece tokenizer and 128-token shards
  local name=$1 lang=$2; shift 2
  [ -f "$OUT/$name/tokenizer/tokenizer.json" ] || $PY -m data_prep tokenizer --input "$@" --vocab-size "${VOCAB:-4000}" --lang "$lang" --out "$OUT/$name/tokenizer"
  [ -f "$OUT/$name/shards/manifest.json" ] || $PY -m data_prep shards --input "$@" --tokenizer "$OUT/$name/tokenizer" --lang "$lang" --seq-len 128 --out "$OUT/$name/shards"
}

pretrain() {  # pretrain RUN SHARDS STEPS WARMUP [overrides...]
  local run=$1 shards=$2 steps=$3 warmup=$4; shift 4
  [ -d "$OUT/runs/$run/hf" ] && return 0
  $PY -m pretrain +experiment=quickstart data.path="$shards" output_dir="$OUT/runs/$run" trainer.max_steps="$steps" \
    checkpoint_every_n_steps=$(( steps / 8 > 0 ? steps / 8 : 1 )) keep_checkpoints=-1 optim.warmup_steps="$warmup" "$@"
}

checkpoint() { printf '%s/runs/%s/checkpoints/step-%08d.ckpt\n' "$OUT" "$1" "$2"; }

task_file() {  # the bundled training slice, the full dev set
  cat > "$OUT/tasks/$1_sentiment.yaml" <<EOF
name: $1_sentiment
type: classification
train: pkg://pretrain.probe/samples/$1_sentiment/train.jsonl
dev: $PROBE_DATA/$1_sentiment/dev.jsonl
text: text
label: label
EOF
}

probe() {  # probe LANG MODEL...
  local lang=$1; shift
  $PY -m pretrain.probe "$@" --task "$OUT/tasks/${lang}_sentiment.yaml" --seeds "${SEEDS:-3}" --out "$OUT/probes"
}

q=$(( STEPS / 8 )); h=$(( STEPS / 2 )); w=$(( STEPS / 12 ))
for lang in en zh; do
  [ -s "$OUT/text/$lang.txt" ] || texts_of "$PROBE_DATA/${lang}_sentiment/train.jsonl" > "$OUT/text/$lang.txt"
  prepare "$lang" "$lang" "$OUT/text/$lang.txt" --doc-per-line
  pretrain "$lang" "$OUT/$lang/shards" "$STEPS" "$w"
done
prepare ko ko "$PROBE_DATA/ko_reviews_unlabelled.txt"
pretrain ko "$OUT/ko/shards" "$STEPS" "$w"
if [ -n "${KO_GENERAL:-}" ]; then
  prepare ko_general ko $KO_GENERAL  # one path or several, space-separated
  [ -f "$OUT/ko_general/reviews/manifest.json" ] || $PY -m data_prep shards --input "$PROBE_DATA/ko_reviews_unlabelled.txt" \
    --tokenizer "$OUT/ko_general/tokenizer" --lang ko --seq-len 128 --out "$OUT/ko_general/reviews"
  pretrain ko_general "$OUT/ko_general/shards" "$h" "$w"
  pretrain ko_continued "$OUT/ko_general/reviews" "$h" $(( h / 12 )) model.init_from="$OUT/runs/ko_general/hf" optim.lr=1e-3
fi

for lang in en zh ko; do
  task_file "$lang"
  probe "$lang" "random:$OUT/runs/$lang/hf" $(for s in $q $(( 2 * q )) $h "$STEPS"; do checkpoint "$lang" "$s"; done)
done
if [ -n "${KO_GENERAL:-}" ]; then
  probe ko "random:$OUT/runs/ko_general/hf" "$(checkpoint ko_general "$h")" \
    $(for s in $q $(( 2 * q )) $h; do checkpoint ko_continued "$s"; done)
fi
$PY - "$OUT/probes" <<'PYTHON'
import sys
from pretrain.probe import results
rows = results.read_rows(sys.argv[1])
print(results.format_table(results.summary(rows, {t: "accuracy" for t in ("en_sentiment", "zh_sentiment", "ko_sentiment")})))
PYTHON
echo "results: $OUT/probes/probes.csv"
