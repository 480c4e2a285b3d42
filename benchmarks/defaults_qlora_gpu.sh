#!/usr/bin/env bash
# The QLoRA defaults check at full length on both data sets, for a CUDA GPU: one key at a time
# around recipes/qlora.yaml, each a `python -m finetune sweep` on the FAQ and on Disfl-QA at the
# recipe's 5 epochs (on 2 CPU cores a 3-epoch Disfl-QA point costs about an hour with in-batch
# negatives and three with mined ones, so the CPU check swept some keys there at 1 epoch or 80
# steps). benchmarks/pick_defaults.py then chooses each key by the mean relative validation gain
# over both sets. Last, full fine-tuning on each set's sweep splits, for the "within 1 point of
# full fine-tuning" check: once at recipes/full.yaml's defaults, and once as a sweep of its own over
# lr x negatives x epochs (12 points a set; FULL_GRID), whose final run is the validation choice,
# so both methods are compared at settings chosen the same way. No test score takes part in any choice.
#
#   bash benchmarks/defaults_qlora_gpu.sh                        # every key: lr negatives r batch epochs
#   bash benchmarks/defaults_qlora_gpu.sh negatives r            # some keys
#
# A sweep resumes where it stopped (runs/gpu-defaults/<set>-<key>), so a run cut off by a time limit
# continues when the same command runs again. Writes benchmarks/results/defaults_qlora_gpu_<key>.json
# and defaults_qlora_gpu_test.json (each sweep's final run and the full fine-tuning runs).
# Environment: PYTHON (default python), DISFL (default ../shared/data/disfl_qa), FULL_GRID (the full
# fine-tuning sweep's grid),
# EXTRA (more overrides for every run, e.g. "device=cpu train.max_steps=2" to try the script).
set -uo pipefail
py=${PYTHON:-python}
dir=runs/gpu-defaults
read -r -a extra <<<"${EXTRA:-device=cuda}"
read -r -a full_grid <<<"${FULL_GRID:-train.lr=5e-5,1e-4,2e-4 negatives.strategy=none,mined train.epochs=3,5}"
declare -A grid=(
  [lr]="train.lr=2e-4,5e-4,1e-3"
  [negatives]="negatives.strategy=none,mined"
  [r]="lora.r=8,16,32"
  [batch]="train.batch_size=16,32,64"
  [epochs]="train.epochs=3,5,8"
)
declare -A data=(
  [faq]=""
  [disfl]="data=${DISFL:-../shared/data/disfl_qa} train.eval_steps=44"
)
keys=("$@")
[ ${#keys[@]} -eq 0 ] && keys=(lr negatives r batch epochs)
for key in "${keys[@]}"; do
  [ -n "${grid[$key]:-}" ] || { echo "unknown key '$key'; choose from: ${!grid[*]}" >&2; exit 2; }
done

for key in "${keys[@]}"; do
  for set in faq disfl; do
    echo "== $set $key: ${grid[$key]}"
    # shellcheck disable=SC2086  # data[] holds several overrides
    "$py" -m finetune sweep recipes/qlora.yaml ${data[$set]} "${extra[@]}" ${grid[$key]} --dir "$dir/$set-$key" \
      || { echo "== $set $key FAILED (exit $?)"; continue 2; }
  done
  "$py" benchmarks/pick_defaults.py "$dir/faq-$key" "$dir/disfl-$key" --name "defaults_qlora_gpu_$key"
done

finals=()
for set in faq disfl; do
  splits=$(ls "$dir"/"$set"-*/splits.json 2>/dev/null | head -n 1)
  [ -n "$splits" ] || continue
  full=$dir/$set-full
  if [ ! -f "$full/metrics.json" ]; then
    echo "== $set full fine-tuning on $splits"
    # shellcheck disable=SC2086
    "$py" -m finetune run recipes/full.yaml ${data[$set]} "${extra[@]}" "splits.file=$splits" --run-dir "$full" --overwrite \
      || echo "== $set full FAILED (exit $?)"
  fi
  echo "== $set full fine-tuning swept: ${full_grid[*]}"
  # shellcheck disable=SC2086
  "$py" -m finetune sweep recipes/full.yaml ${data[$set]} "${extra[@]}" "splits.file=$splits" "${full_grid[@]}" \
    --dir "$dir/$set-fullgrid" || echo "== $set full sweep FAILED (exit $?)"
  for run in "$dir"/"$set"-*/final "$full"; do [ -f "$run/metrics.json" ] && finals+=("$run"); done
done
[ ${#finals[@]} -gt 0 ] && "$py" benchmarks/collect_runs.py "${finals[@]}" --out benchmarks/results/defaults_qlora_gpu_test.json
