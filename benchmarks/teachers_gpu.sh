#!/usr/bin/env bash
# Issue 39's benchmark at full length, for a CUDA GPU: on the FAQ and on Disfl-QA, every row on the splits
# of the first run, each paired per test query against MiniLM QLoRA alone by benchmarks/teachers.py. On 2
# CPU cores these rows were bounded (Disfl-QA: 60 QLoRA steps, a 300-step reranker; an mpnet step takes
# about 96 s there, measured in results/teachers_disfl_distill.json); here each runs the shipped recipe's schedule:
#
#   1. qlora-minilm     recipes/qlora.yaml as shipped: the reference, and the first stage of 4 and 6
#   2. qlora-mpnet      the same recipe on all-mpnet-base-v2: the teacher
#   3. distill/final    MiniLM taught by 2, teacher.loss and teacher.mnrl_weight chosen on validation (a sweep
#                       over kl_div and in_batch_kl x 0, 0.5, 1)
#   4. reranker-minilm  recipes/reranker.yaml from MiniLM's weights behind 1 (negatives mined by 1), k on validation
#   5. reranker-mpnet   the same from mpnet's weights
#   6. two-stage        the reranker from 5's starting weights behind the distilled student 3
#
#   bash benchmarks/teachers_gpu.sh                 # both sets
#   bash benchmarks/teachers_gpu.sh disfl           # one set
#
# A finished run (its metrics.json) is kept and a sweep resumes, so a run cut off by a time limit continues when
# the same command runs again. Writes benchmarks/results/teachers_gpu_<set>.json.
# Environment: PYTHON (default python), DISFL (default ../shared/data/disfl_qa), MPNET (all-mpnet-base-v2's
# folder; default ~/.cache/finetune-models/all-mpnet-base-v2, as ../shared/scripts/get_mpnet.sh writes it),
# DIR (default runs/gpu-teachers), EXTRA (overrides for every run; default device=cuda).
# To try it on a CPU in about 12 minutes (any checkpoint standing in for mpnet; delete the results file after):
#   EXTRA="device=cpu train.max_steps=2" MPNET=<a model folder> DIR=runs/smoke bash benchmarks/teachers_gpu.sh faq
set -uo pipefail
py=${PYTHON:-python}
dir=${DIR:-runs/gpu-teachers}
mpnet=${MPNET:-$HOME/.cache/finetune-models/all-mpnet-base-v2}
read -r -a extra <<<"${EXTRA:-device=cuda}"
declare -A data=(
  [faq]=""
  [disfl]="data=${DISFL:-../shared/data/disfl_qa}"
)
sets=("$@")
[ ${#sets[@]} -eq 0 ] && sets=(faq disfl)
for set in "${sets[@]}"; do
  [ -n "${data[$set]+x}" ] || { echo "unknown set '$set'; choose from: ${!data[*]}" >&2; exit 2; }
done
[ -f "$mpnet/config.json" ] || { echo "no all-mpnet-base-v2 at $mpnet; run ../shared/scripts/get_mpnet.sh or set MPNET" >&2; exit 2; }

run() {  # run SET NAME RECIPE OVERRIDES...: one run, skipped when it has finished
  local set=$1 name=$2 recipe=$3
  shift 3
  [ -f "$dir/$set/$name/metrics.json" ] && return 0
  echo "== $set $name"
  # shellcheck disable=SC2086  # data[] holds several overrides
  "$py" -m finetune run "recipes/$recipe.yaml" ${data[$set]} "${extra[@]}" "$@" "name=$name" \
    --run-dir "$dir/$set/$name" --overwrite || echo "== $set $name FAILED (exit $?)"
}

for set in "${sets[@]}"; do
  d=$dir/$set
  run "$set" qlora-minilm qlora
  [ -f "$d/qlora-minilm/metrics.json" ] || continue
  splits="splits.file=$d/qlora-minilm/splits.json"
  run "$set" qlora-mpnet qlora "model.name=$mpnet" "$splits"
  if [ -f "$d/qlora-mpnet/metrics.json" ]; then
    echo "== $set distill: teacher.loss and teacher.mnrl_weight chosen on validation"
    # shellcheck disable=SC2086
    "$py" -m finetune sweep recipes/qlora.yaml ${data[$set]} "${extra[@]}" "$splits" "teacher.model.name=$d/qlora-mpnet" \
      teacher.loss=kl_div,in_batch_kl teacher.mnrl_weight=0,0.5,1 --dir "$d/distill" || echo "== $set distill FAILED (exit $?)"
  fi
  run "$set" reranker-minilm reranker "retriever.name=$d/qlora-minilm/model" "$splits"
  run "$set" reranker-mpnet reranker "model.name=$mpnet" "retriever.name=$d/qlora-minilm/model" "$splits"
  [ -f "$d/distill/final/metrics.json" ] &&
    run "$set" two-stage reranker "model.name=$mpnet" "retriever.name=$d/distill/final/model" "$splits"
  rows=()
  for r in qlora-mpnet distill/final reranker-minilm reranker-mpnet two-stage; do
    [ -f "$d/$r/metrics.json" ] && rows+=("$d/$r")
  done
  [ ${#rows[@]} -gt 0 ] && "$py" benchmarks/teachers.py --reference "$d/qlora-minilm" "${rows[@]}" --name "teachers_gpu_$set"
done
