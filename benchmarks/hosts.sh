#!/usr/bin/env bash
# Issue 39's numbers: each host alone and with its plug-in (studies hosts-trlearner-omniglot, cml-boil-omniglot,
# protonet-snell-omniglot), one cell per core, on this checkout's code.
# 1. pilot: a host's seed-0 cell trained to N on validation only (benchmarks/pilot.py), in its study directory;
#    raise N by the study's ladder until the plateau criterion holds, then write N into the study's [preset_set].
# 2. cells: the study's cells, each trained (or resumed from the pilot), its test tasks scored once and its small
#    results kept in results/<study>/ (metagrad study --keep), so the queue resumes across sessions. A cell is
#    started only when MINUTES (its estimated wall time) fits before DEADLINE (seconds since the epoch).
# 3. share: a cell whose training is another cell's (its preset differs only in eval.*) starts from that one's
#    checkpoint: Snell's 5-way and 20-way tests of one 60-way ProtoNet training.
#
#   bash benchmarks/hosts.sh pilot cml-boil-omniglot boil-omniglot-5w1s-cpu 2000
#   DEADLINE=$(date -d '+150 min' +%s) bash benchmarks/hosts.sh cells cml-boil-omniglot 60 \
#       boil-omniglot-5w1s-cpu/maml:1 boil-omniglot-5w1s-cpu/cml:0
#   bash benchmarks/hosts.sh share protonet-snell-omniglot protonet-omniglot-5w1s-snell/maml/seed0 \
#       protonet-omniglot-20w1s-snell/maml/seed0
set -u
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export OMP_NUM_THREADS=1
what=$1 study=$2; shift 2
case $what in
  pilot)
    echo "$(date -u +%FT%TZ) pilot $1 to $2 ($(git rev-parse --short HEAD))" >> "$L/$study.log"
    "$PY" benchmarks/pilot.py "$study" "runs/$study" "$@" >> "$L/$study.log" 2>&1
    rc=$?; echo "$(date -u +%FT%TZ) pilot $1 to $2: exit $rc" >> "$L/$study.log" ;;
  cells)
    minutes=$1; shift
    for c in "$@"; do
      fits "$minutes" "$L/$study.log" "$c" || continue
      echo "$(date -u +%FT%TZ) $c: training ($(git rev-parse --short HEAD))" >> "$L/$study.log"
      "$ROOT/.venv/bin/metagrad" study "$study" --out "runs/$study" --keep "results/$study" --only "$c" \
          --no-report >> "$L/$study.log" 2>&1
      rc=$?; echo "$(date -u +%FT%TZ) $c: exit $rc" >> "$L/$study.log"
    done ;;
  share)   # a cell that trains exactly as another one (presets differing only in eval.*, e.g. Snell's 5-way and
           # 20-way tests of one 60-way training) starts from its checkpoint, curve and wall time, not from scratch
    from=runs/$study/$1 to=runs/$study/$2
    [ -f "$from/checkpoint.pt" ] || { echo "$from has no checkpoint" >&2; exit 2; }
    [ -e "$to" ] && { echo "$to exists: leave it (or remove it to start it from $from)" >&2; exit 2; }
    mkdir -p "$to" && cp "$from/checkpoint.pt" "$from/config.json" "$from/metrics.jsonl" "$to/"
    echo "$(date -u +%FT%TZ) $2 starts from $1's checkpoint" >> "$L/$study.log" ;;
  *) echo "usage: hosts.sh pilot|cells|share STUDY ..." >&2; exit 2 ;;
esac
