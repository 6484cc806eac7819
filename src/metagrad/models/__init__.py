"""Plain ``torch.nn.Module`` models. Each accepts ``forward(x, return_features=False)``.

:func:`create` builds a benchmark's model by name (a built-in, registered in its own file with :func:`register`;
an import path ``package.module:factory``; or an entry point of group ``metagrad.models``; docs/own-model.md). A model may offer ``forward_batched(params, x,
return_features=False)`` to run T tasks with stacked parameters in one computation, or have one registered
for its type (:mod:`metagrad.batched`); the learner falls back to a per-task loop otherwise. The models import
nothing from ``functional``, ``batched``, ``data`` or ``methods``.
"""

from .conv4 import Conv4
from .gcn import GCN
from .mlp import MLP
from .registry import auto_name, available, create, factory, register, wrap, wrappers
from .tnet import TNet, Transform

__all__ = ["GCN", "MLP", "Conv4", "TNet", "Transform", "auto_name", "available", "create", "factory", "register",
           "wrap", "wrappers"]
