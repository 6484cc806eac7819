"""Whether ``torch.compile`` can serve MAML: one first- and one second-order meta-gradient through a compiled
Conv4 forward (Omniglot 5-way 1-shot shapes, random images). Prints, per order, "ok" or torch's error.

Usage:
    .venv/bin/python benchmarks/compile_check.py
"""

from __future__ import annotations

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F
from torch.func import functional_call

from metagrad.models import Conv4


def main() -> int:
    # Donated buffers forbid create_graph outright; without them the double backward's own error shows.
    functorch_config.donated_buffer = False
    torch.manual_seed(0)
    model = Conv4(1, 5, 64, image_size=28)
    params = dict(model.named_parameters())
    forward = torch.compile(lambda p, x: functional_call(model, p, (x,)))
    xs, ys = torch.rand(5, 1, 28, 28), torch.arange(5)
    xq, yq = torch.rand(75, 1, 28, 28), torch.arange(5).repeat_interleave(15)
    print(f"torch {torch.__version__}")
    for order in ("first", "second"):
        try:
            loss = F.cross_entropy(forward(params, xs), ys)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=order == "second")
            fast = {n: p - 0.4 * g for (n, p), g in zip(params.items(), grads)}
            F.cross_entropy(forward(fast, xq), yq).backward()
            print(f"{order} order: ok")
        except RuntimeError as e:
            print(f"{order} order: RuntimeError: {str(e).splitlines()[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
