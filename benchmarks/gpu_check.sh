#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one command, for a session lent a GPU machine (see the device
# tool). That machine has its own PyTorch and no ../shared/data: the library runs from src/ and the Omniglot
# cases use random images of the same shapes. Peers: metagrad and the plain loop (higher and learn2learn are
# not installed there). Results go to $OUT (or runs/gpu), one JSON line per case plus the printed tables.
#   bash benchmarks/gpu_check.sh            # about 5-8 minutes on one H200
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  speed=("$py" benchmarks/speed.py --device cuda --random-images --no-reexec --out "$out/speed-gpu.jsonl")
  "${speed[@]}" --cases omniglot5 --orders second first --steps 1 --rounds 3 --block 3 --impls metagrad loop 'metagrad[graph]' 'metagrad[per-task]'
  "${speed[@]}" --cases omniglot20 --orders second --steps 1 --rounds 3 --block 3 --impls metagrad loop 'metagrad[graph]'
  "${speed[@]}" --cases omniglot5 --orders second --steps 5 --rounds 2 --block 2 --impls metagrad loop
  "${speed[@]}" --cases sinusoid --orders second --steps 1 5 --rounds 3 --block 3 --impls metagrad loop
  "$py" benchmarks/grouped_forward.py --device cuda --queries 1 5 15 --rounds 3 --group-images 256 1024 100000
} 2>&1 | tee "$out/gpu-check.log"
