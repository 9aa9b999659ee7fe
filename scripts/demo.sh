#!/usr/bin/env bash
# The main job on the embedded default (configs/tiny.toml): synthetic Criteo day files →
# preprocess → 2-process torchrun training with DMP-sharded tables → test AUC, printed
# beside the Bayes-optimal AUC of the same split. Reruns reuse the data already made.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO=${DEMO_DIR:-runs/demo}
DAYS=${DEMO_DAYS:-4}
ROWS=${DEMO_ROWS_PER_DAY:-200000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # dlrm sets threads per rank itself
start=$(date +%s)

.venv/bin/dlrm synth --out "$DEMO/raw" --days "$DAYS" --rows-per-day "$ROWS" --seed 0
inputs=()
for ((d = 0; d < DAYS; d++)); do inputs+=("$DEMO/raw/day_$d"); done
.venv/bin/dlrm preprocess --input "${inputs[@]}" --out "$DEMO/data"
rm -rf "$DEMO/run"
.venv/bin/torchrun --standalone --nproc_per_node 2 -m dlrm train --config configs/tiny.toml \
    --data.path="$DEMO/data" --run-dir "$DEMO/run"

.venv/bin/python - "$DEMO" "$(($(date +%s) - start))" <<'PY'
import json, sys
demo, seconds = sys.argv[1], sys.argv[2]
metrics = [json.loads(line) for line in open(f"{demo}/run/metrics.jsonl")]
test = [m for m in metrics if "eval/test/auc" in m][-1]
bayes = json.load(open(f"{demo}/raw/truth.json"))["splits"]["test"]["bayes_auc"]
print(f"demo: test AUC {test['eval/test/auc']:.4f} (Bayes-optimal {bayes:.4f}, gap "
      f"{bayes - test['eval/test/auc']:.4f}), log loss {test['eval/test/logloss']:.4f}, "
      f"{test['eval/test/rows']} test rows; {seconds}s; run in {demo}/run")
PY
