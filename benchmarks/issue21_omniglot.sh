#!/usr/bin/env bash
# Issue 21: the Omniglot 5-way 1-shot plateau study, resumable across sessions (docs/results.md).
#
# Runs the cells from a frozen checkout of commit 1515b74 (a git worktree, default ../study), so that changes
# to the package while the study runs cannot alter a cell. Each cell is kept in results/ as soon as it finishes
# (benchmarks/issue21_cells.py: trained on the frozen code, kept by this checkout's) and skipped once kept; an
# unfinished cell resumes from its checkpoint if its run directory exists. Budgets are the studies' own, fixed on
# validation (Finn 6,000; α 0.01 × 5: below).
#
# Two lanes, one thread each (the 2-core machine), drawing from the same cells in different orders; a cell (or a
# pilot) that the other lane is training is skipped (a flock on <run dir>.lock), so neither lane idles while work
# is left. First the α 0.01 × 5 MAML pilots: seeds 0, 1, 2 to PILOT_N on validation (the 4,000 of the study file
# was met by seed 0 only, docs/results.md); its Meta-GNA and CxGrad cells run once the study file holds the N all
# three seeds meet. Then Finn's setting (MAML, TRLearner, the shared-setting view: CML, Meta-GNA, CxGrad) and its
# no-norm MAML (CxGrad's baseline). Commit results/ after each kept cell.
#
#   bash benchmarks/issue21_omniglot.sh            # from the repository root; logs in runs/logs/
set -u
. "$(dirname "$0")/issue21_env.sh"

cells() {  # $1 study, $2 results folder, then METHOD:SEED ...
  "$PY" benchmarks/issue21_cells.py --frozen "$FROZEN" "$@" >> "$L/$2.log" 2>&1
}
PILOT_N=${PILOT_N:-8000}  # the α 0.01 × 5 budget being checked on validation
budget_set() { grep -q "train.iterations=$PILOT_N\"" src/metagrad/configs/studies/issue21-omniglot-a001x5.toml; }
pilot() {  # MAML at α 0.01 × 5 to PILOT_N with eval.split=val, in the study's own cell directories; $@ seeds
  local d=runs/issue21-a001x5/omniglot-5w1s-a001x5-plateau/maml s r
  mkdir -p "$d"
  for s in "$@"; do
    (
      flock -n 9 || { echo "maml:$s: pilot training in the other lane, skipped"; exit 0; }
      "$PY" -c "import sys; from metagrad.rundir import read_records; sys.exit(not any(
          r.get('iteration') == $PILOT_N and r.get('split') == 'val' for r in read_records('$d/seed$s')))" \
          2>/dev/null && exit 0   # validated at PILOT_N
      r=; [ -f "$d/seed$s/checkpoint.pt" ] && r=--resume
      PYTHONPATH="$FROZEN/src" OMP_NUM_THREADS=1 "$PY" -m metagrad train --config omniglot-5w1s-a001x5-plateau \
          --out-dir "$d/seed$s" $r --no-progress --set train.iterations="$PILOT_N" eval.split=val train.seed=$s plugins=
      echo "maml:$s: pilot to $PILOT_N on validation, exit $?"
    ) 9>"$d/seed$s.lock"
  done >> "$L/issue21-a001x5-pilot.log" 2>&1
}
a001x5() { budget_set && cells issue21-omniglot-a001x5 issue21-a001x5 "$@"; }
finn() { cells issue21-omniglot-finn issue21-finn "$@"; }
no_norm() { cells issue21-omniglot-finn-no-norm issue21-finn-no-norm "$@"; }
A="maml:0 maml:1 maml:2 meta_gna:0 meta_gna:1 meta_gna:2 cxgrad:0 cxgrad:1 cxgrad:2"
F="maml:0 maml:1 maml:2 trlearner:0 trlearner:1 trlearner:2 cml:0 cml:1 cml:2 meta_gna:0 meta_gna:1 meta_gna:2 cxgrad:0 cxgrad:1 cxgrad:2"
N="maml:0 maml:1 maml:2"
rev() { printf '%s\n' "$@" | tac | tr '\n' ' '; }
lane1() {
  budget_set || pilot 1 0 2
  a001x5 $(rev $A); finn $F; no_norm $N; a001x5 $(rev $A)
}
lane2() {
  budget_set || pilot 0 1 2
  a001x5 $A; finn $(rev $F); no_norm $(rev $N); a001x5 $A
}
lane1 & lane2 & wait
