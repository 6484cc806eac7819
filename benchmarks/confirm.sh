#!/usr/bin/env bash
# The confirmatory study of docs/preregistration.md: its cells, one at a time, each trained on both cores as two
# ranks of one torchrun job on the frozen commit 1515b74 (benchmarks/issue21_ddp.py, as the issue-21 grid was),
# then kept by benchmarks/issue21_cells.py (test tasks scored once, on the frozen code; small results copied to
# results/confirm-<setting>/). A kept cell is skipped, so the queue resumes across sessions; run directories do
# not outlive a session, so a cell is only started when its estimated wall time fits before DEADLINE (seconds
# since the epoch; default: no limit), and the queue goes on with a shorter cell when it does not.
#
#   DEADLINE=$(date -d '+150 min' +%s) bash benchmarks/confirm.sh          # the whole queue, in order
#   bash benchmarks/confirm.sh finn maml:3 meta_gna:3                       # chosen cells of one setting
set -u
. "$(dirname "$0")/issue21_env.sh"
# minutes of wall time on two ranks of an otherwise idle 2-core machine (issue 21: 2 h at α 0.01 × 5; α 0.5 × 1: 13-19
# min measured), times 1.5
minutes() { case $1 in a001x5) echo 190 ;; finn:trlearner) echo 100 ;; finn:*) echo 55 ;; a05x1:*) echo 30 ;; esac; }
kept() {  # $1 setting, $2 method:seed → 0 when results/confirm-$1 holds the cell's test records
  [ -f "results/confirm-$1/study.json" ] && "$PY" -c "import json, sys
cells = json.load(open('results/confirm-$1/study.json')).get('cells', [])
sys.exit(not any(f\"{c['method']}:{c['seed']}\" == '$2' and c.get('status') not in ('failed', 'n/a') for c in cells))"
}
cell() {  # $1 setting (a001x5 | finn | a05x1), $2 method:seed
  local study=confirm-omniglot-$1 out=confirm-$1 est
  kept "$1" "$2" && return 0
  est=$(minutes "$1:${2%%:*}"); [ -z "$est" ] && est=$(minutes "$1")
  fits "$est" "$L/$out.log" "$2 ($1)" || return 0
  echo "$(date -u +%FT%TZ) $2 ($1): training on 2 ranks" >> "$L/$out.log"
  PYTHONPATH="$FROZEN/src" OMP_NUM_THREADS=1 "$ROOT/.venv/bin/torchrun" --nproc-per-node 2 \
      benchmarks/issue21_ddp.py "src/metagrad/configs/studies/$study.toml" "runs/$out" "${2%%:*}" "${2##*:}" \
      >> "$L/$out.log" 2>&1 || { echo "$2: training failed (exit $?)" >> "$L/$out.log"; return 0; }
  "$PY" benchmarks/issue21_cells.py --frozen "$FROZEN" "$study" "$out" "$2" >> "$L/$out.log" 2>&1
  echo "$(date -u +%FT%TZ) $2 ($1): done" >> "$L/$out.log"
}
if [ $# -gt 0 ]; then
  setting=$1; shift
  for c in "$@"; do cell "$setting" "$c"; done
  exit 0
fi
# The preregistered queue: seed by seed, so that every hypothesis gains a replicate as early as possible.
for s in 3 4 5; do
  cell finn maml:$s; cell finn meta_gna:$s; cell finn trlearner:$s
  cell a05x1 maml:$s; cell a05x1 cml:$s
  cell a001x5 maml:$s; cell a001x5 cxgrad:$s; cell a001x5 meta_gna:$s
done
for s in 6 7; do cell a05x1 maml:$s; cell a05x1 cml:$s; cell a001x5 maml:$s; cell a001x5 cxgrad:$s; done
cell a05x1 maml:8; cell a05x1 cml:8
