"""Plain ``torch.nn.Module`` models. Each accepts ``forward(x, return_features=False)``.

A model may also offer ``forward_batched(params, x, return_features=False)`` to run T tasks with stacked
parameters in one computation; the learner falls back to a per-task loop otherwise.
"""

from .conv4 import Conv4
from .gcn import GCN
from .mlp import MLP

__all__ = ["GCN", "MLP", "Conv4"]
