# The set-up shared by the study scripts in benchmarks/ (sourced, not run): this checkout's environment, the logs
# folder, the data cache, and `fits`, the deadline check of a queue whose cells must end before the session does.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$ROOT/.venv/bin/python
L=$ROOT/runs/logs
mkdir -p "$L"
cd "$ROOT" || exit 2
export METAGRAD_CACHE=${METAGRAD_CACHE:-$ROOT/runs/cache}  # the Omniglot/MNIST arrays, built once
mkdir -p "$METAGRAD_CACHE"
DEADLINE=${DEADLINE:-9999999999}
# fits MINUTES LOG LABEL: 0 when MINUTES of wall time from now end before DEADLINE (seconds since the epoch;
# default: no limit); otherwise 1, after a line in LOG saying that LABEL is left for later
fits() {
  [ $(( $(date +%s) + 60 * $1 )) -le "$DEADLINE" ] && return 0
  echo "$(date -u +%FT%TZ) $3: ~$1 min does not fit before the deadline, left for later" >> "$2"
  return 1
}
