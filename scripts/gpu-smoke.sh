#!/usr/bin/env bash
# The whole chain on one GPU with the embedded SmolLM2-135M-Instruct in bf16, on a small demo
# (nothing is downloaded): prepare-model, prepare-data, teacher and student SFT, two caches,
# subdomains, TD and SCD+AW, evaluation, report. Prints, per stage, its wall seconds, its steady
# tokens/s and its peak GPU memory (from the stage's own scd-work lines).
#   scripts/gpu-smoke.sh                      # on a machine with one CUDA GPU; sets up .venv first
#   SMOKE_DIR=/tmp/smoke scripts/gpu-smoke.sh # where to work (default: a new temporary folder)
#   SMOKE_EXTRA=more.yaml scripts/gpu-smoke.sh  # a config layered on top (e.g. tiny models on a CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
work="${SMOKE_DIR:-$(mktemp -d)}"
mkdir -p "$work"
config="$work/smoke.yaml"
cat > "$config" <<YAML
results_dir: $work/results
data: {max_train_samples: 320}
sft: {precision: bf16, teacher: {n_checkpoints: 2, epochs: 1}, student: {epochs: 1}}
distill: {precision: bf16, phases: 2, epochs_per_phase: 0.5}
YAML
sets=()
if [ -n "${SMOKE_EXTRA:-}" ]; then
  while IFS= read -r line; do sets+=(--set "$line"); done < <(.venv/bin/python -c "
import sys, yaml
def flat(node, prefix=''):
    for key, value in node.items():
        if isinstance(value, dict): yield from flat(value, prefix + key + '.')
        else: print(f'{prefix}{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix(\"...\").strip()}')
list(flat(yaml.safe_load(open(sys.argv[1]))))" "$SMOKE_EXTRA")
fi
.venv/bin/python -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu (no CUDA: not a GPU result)')"
stage() {  # stage NAME scd-pipeline-arguments...
  local name=$1; shift
  local started=$EPOCHREALTIME
  if ! .venv/bin/scd-pipeline "$@" --config "$config" "${sets[@]}" > "$work/$name.log" 2>&1; then
    echo "stage $name failed; its log: $work/$name.log"; tail -5 "$work/$name.log"; exit 1
  fi
  echo "$name $started $EPOCHREALTIME" >> "$work/times"
}
: > "$work/times"
stage prepare-model-teacher prepare-model --role teacher
stage prepare-model-student prepare-model --role student
stage prepare-data prepare-data
stage sft-teacher sft --role teacher
stage sft-student sft --role student
stage cache-1 cache-logits --checkpoint 1
stage cache-2 cache-logits --checkpoint 2
stage subdomains estimate-subdomains
stage distill-td distill --method td
stage distill-scd_aw distill --method scd_aw
best=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['best_index'])" "$work/results/demo/teacher/checkpoints.json")
stage evaluate-teacher evaluate --model "$work/results/demo/teacher/ckpt-$best"
stage evaluate-student-sft evaluate --model "$work/results/demo/student_sft"
stage evaluate-td evaluate --model "$work/results/demo/students/td"
stage evaluate-scd_aw evaluate --model "$work/results/demo/students/scd_aw"
stage report report
.venv/bin/python - "$work" <<'PY'
import sys
from pathlib import Path

from scd_pipeline.engine.worklog import parse

work = Path(sys.argv[1])
print(f"{'stage':<22} {'seconds':>8} {'kind':>9} {'tokens/s':>10} {'peak GPU GB':>12}")
total = 0.0
for line in (work / "times").read_text().splitlines():
    name, started, ended = line.split()
    seconds = float(ended) - float(started)
    total += seconds
    records = parse((work / f"{name}.log").read_text(errors="replace").splitlines()) or [{}]
    for record in records:
        peak = record.get("peak_gpu_bytes")
        print(f"{name:<22} {float(seconds):>8.1f} {record.get('kind', '-'):>9} "
              f"{record.get('steady_tokens_per_s', float('nan')):>10.1f} "
              f"{'-' if peak is None else f'{peak / 1e9:.2f}':>12}")
print(f"total {total:.0f} s; logs and results in {work}")
PY
