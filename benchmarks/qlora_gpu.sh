#!/usr/bin/env bash
# Encoder fine-tuning on a CUDA GPU at equal batch size: nf4 LoRA and 16-bit LoRA per backend
# (peft, and unsloth when installed), and full fine-tuning, all on one saved splits file.
# Each run is `python -m finetune run recipes/qlora.yaml ...`; the numbers come from the runs'
# own metrics.json, collected by benchmarks/collect_runs.py.
#
#   bash benchmarks/qlora_gpu.sh faq   runs/adapter-faq-*/splits.json
#   bash benchmarks/qlora_gpu.sh disfl runs/adapter-disfl-*/splits.json
#
# Environment: PYTHON (default python), DISFL (default ../shared/data/disfl_qa),
# BACKENDS (default "peft unsloth"), FULL_LR (default 1e-4), OUT (result JSON).
set -uo pipefail
which=$1
splits=$2
py=${PYTHON:-python}
out=${OUT:-benchmarks/results/qlora_gpu_$which.json}
dir=runs/gpu-$which
common=(device=cuda "splits.file=$splits" "output.dir=$dir")
case $which in
  faq) ;;
  disfl) common+=("data=${DISFL:-../shared/data/disfl_qa}" train.epochs=1 train.eval_steps=50) ;;
  *) echo "usage: $0 faq|disfl SPLITS_JSON" >&2; exit 2 ;;
esac

run() {  # name, overrides...
  local name=$1; shift
  echo "== $name: $*"
  "$py" -m finetune run recipes/qlora.yaml "name=$which-$name" "${common[@]}" "$@" || echo "== $name FAILED (exit $?)"
}

for backend in ${BACKENDS:-peft unsloth}; do
  if [ "$backend" = unsloth ] && ! "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('unsloth') is None)"; then
    echo "== unsloth is not installed; skipping its runs"; continue
  fi
  run "$backend-nf4" "backend=$backend" quantization=nf4
  run "$backend-lora16" "backend=$backend" quantization=none
done
run full method=full quantization=none "train.lr=${FULL_LR:-1e-4}"
"$py" benchmarks/collect_runs.py "$dir"/*/ --out "$out"
