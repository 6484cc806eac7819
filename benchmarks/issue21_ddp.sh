#!/usr/bin/env bash
# Issue 21: cells of the Omniglot plateau study one at a time, each trained on both cores as two ranks of one
# torchrun job (benchmarks/issue21_ddp.py), then kept by benchmarks/issue21_cells.py (test tasks scored once,
# small results copied to results/). A cell at α 0.01 × 5 then fits in one working session (about 2 h: 7,109 s for Meta-GNA seed 1)
# where two one-thread lanes need about 4 h a cell: run directories need not outlive a session.
#
#   bash benchmarks/issue21_ddp.sh a001x5 meta_gna:1 cxgrad:0     # from the repository root; logs in runs/logs/
set -u
. "$(dirname "$0")/issue21_env.sh"
case $1 in
  a001x5) study=issue21-omniglot-a001x5 ;;
  finn) study=issue21-omniglot-finn ;;
  finn-no-norm) study=issue21-omniglot-finn-no-norm ;;
  *) echo "unknown study $1: a001x5, finn or finn-no-norm"; exit 2 ;;
esac
out=issue21-$1
shift
for cell in "$@"; do
  echo "$(date -u +%FT%TZ) $cell: training on 2 ranks" >> "$L/$out.log"
  PYTHONPATH="$FROZEN/src" OMP_NUM_THREADS=1 "$ROOT/.venv/bin/torchrun" --nproc-per-node 2 \
      benchmarks/issue21_ddp.py "src/metagrad/configs/studies/$study.toml" "runs/$out" "${cell%%:*}" "${cell##*:}" \
      >> "$L/$out.log" 2>&1 || { echo "$cell: training failed (exit $?)" >> "$L/$out.log"; continue; }
  "$PY" benchmarks/issue21_cells.py --frozen "$FROZEN" "$study" "$out" "$cell" >> "$L/$out.log" 2>&1
done
