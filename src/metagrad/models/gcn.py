"""Graph convolutional network over one fixed graph, for few-shot node classification.

Kipf & Welling, "Semi-Supervised Classification with Graph Convolutional Networks", ICLR 2017:
``H1 = relu(Â X W1 + b1)``, ``logits = Â H1 W2 + b2`` with ``Â = D^-1/2 (A + I) D^-1/2``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from .registry import bench_name, register


class GCN(nn.Module):
    """A graph convolutional network (Kipf & Welling 2017) whose inputs are node ids of one fixed graph.

    Every forward propagates over the whole graph, then selects the rows of the requested nodes, so a task's
    support and query sets are just ``int64`` node-id tensors. The graph (``features``, ``adjacency``) is held
    as non-persistent buffers: it follows ``.to()`` / ``.double()`` but stays out of ``state_dict()`` and
    ``parameters()``, so checkpoints hold only the weights and MAML never adapts the graph.

    Each hidden layer is ``relu(Â (H W) + b)`` (bias after propagation, as in the paper). The output layer is
    written "propagate, then Linear": ``logits = head(Â H)``, which equals ``Â H W + b`` because propagation is
    linear; this makes ``head`` a plain ``nn.Linear`` whose input ``Â H`` is what ``return_features=True``
    returns (the hook plug-ins such as CML use). Parameters, input → output: ``layers.0.weight``,
    ``layers.0.bias``, …, ``head.weight``, ``head.bias``.

    Sparse ``features`` / ``adjacency`` (COO) keep a forward cheap: a bag-of-words row has ~1% non-zeros.
    Second-order MAML works through them: only the dense operand of each sparse product carries gradients,
    and torch differentiates ``sparse @ dense`` twice (checked against finite differences in the tests).
    For T tasks at once use :meth:`forward_batched`; ``torch.func.vmap`` also works but has no batching rule for
    sparse products and falls back to a slow per-task loop.

    Args:
        features: ``[N, F]`` node features, dense or sparse COO (e.g. ``bench.graph.features``).
        adjacency: ``[N, N]`` normalised adjacency ``Â``, dense or sparse COO.
        hidden: width of the hidden graph convolution, or a sequence of widths for a deeper network.
        out_dim: number of classes (the episode's ways).
        dropout: dropout rate on the input features and on the head's input (0 for MAML: the inner loop
            should see a deterministic function).

    Example:
        >>> bench = metagrad.data.create("cora", "train", ways=2, shots=5, queries=10, meta_batch_size=4)
        >>> model = GCN(bench.graph.features, bench.graph.adjacency, hidden=16, out_dim=2)
        >>> batch = bench.batch(0)
        >>> logits, feats = model(batch.support_x[0], return_features=True)
        >>> logits.shape, feats.shape
        (torch.Size([10, 2]), torch.Size([10, 16]))
    """

    features: torch.Tensor  # buffers, annotated for type checkers (nn.Module.__getattr__ is untyped)
    adjacency: torch.Tensor

    def __init__(self, features: torch.Tensor, adjacency: torch.Tensor, hidden: int | Sequence[int] = 16,
                 out_dim: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        if features.dim() != 2 or adjacency.dim() != 2:
            raise ValueError(f"GCN: features must be [N, F] and adjacency [N, N], got {tuple(features.shape)} "
                             f"and {tuple(adjacency.shape)}")
        n = features.shape[0]
        if tuple(adjacency.shape) != (n, n):
            raise ValueError(f"GCN: adjacency must be [{n}, {n}] for {n} feature rows, got {tuple(adjacency.shape)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"GCN: dropout must be in [0, 1), got {dropout}")
        widths = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        if not widths or min(widths) < 1 or out_dim < 1:
            raise ValueError(f"GCN: need at least one positive hidden width and out_dim >= 1, got {hidden}, {out_dim}")
        # Coalesced COO: sparse.mm and its backward need it, and doing it once here saves it per forward.
        self.register_buffer("features", _coalesce(features), persistent=False)
        self.register_buffer("adjacency", _coalesce(adjacency), persistent=False)
        self.dropout = float(dropout)
        dims = (features.shape[1], *widths)
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in itertools.pairwise(dims)])
        self.head = nn.Linear(dims[-1], out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot-uniform weights and zero biases, the initialisation of Kipf & Welling's reference code."""
        for lin in (*self.linears(), self.head):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def linears(self) -> list[nn.Linear]:
        """The hidden graph-convolution layers' weights, input → output (the head excluded)."""
        return [m for m in self.layers if isinstance(m, nn.Linear)]

    @property
    def num_nodes(self) -> int:
        return self.features.shape[0]

    def propagate(self, h: torch.Tensor) -> torch.Tensor:
        """``Â @ h`` for ``h`` of shape ``[N, d]``."""
        return _matmul(self.adjacency, h)

    def node_features(self) -> torch.Tensor:
        """``[N, d]``: the head's input ``Â H`` for every node of the graph."""
        h = self.features
        for layer in self.linears():
            h = _dropout(h, self.dropout, self.training)
            h = torch.relu(self.propagate(_matmul(h, layer.weight.t())) + layer.bias)
        return self.propagate(h)

    def forward(self, node_ids: torch.Tensor, return_features: bool = False):
        """Logits ``[*node_ids.shape, out_dim]`` (and the head's input ``[*node_ids.shape, d]`` if asked)."""
        _check_ids(node_ids)
        feats = self.node_features()[node_ids]
        out = self.head(_dropout(feats, self.dropout, self.training))
        return (out, feats) if return_features else out

    def forward_batched(self, params: Mapping[str, torch.Tensor], node_ids: torch.Tensor,
                        return_features: bool = False):
        """T tasks at once: ``params[name]`` is ``[T, *shape]``, ``node_ids`` is ``[T, M]``.

        The T weight matrices of a layer are laid side by side, so each sparse product runs once with ``T·d``
        columns instead of T times with ``d``; mathematically identical to :meth:`forward` per task.
        """
        _check_ids(node_ids)
        t = node_ids.shape[0]
        h = self.features  # [N, F], shared by all tasks
        for i in range(len(self.layers)):
            w, b = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]  # [T, d_out, d_in], [T, d_out]
            h = _dropout(h, self.dropout, self.training)
            if h.dim() == 2:  # first layer: one product with the T weights concatenated column-wise
                z = _matmul(h, w.reshape(t * w.shape[1], w.shape[2]).t()).reshape(-1, t, w.shape[1])
            else:  # [N, T, d_in] x [T, d_out, d_in] -> [N, T, d_out]
                z = torch.einsum("ntd,tod->nto", h, w)
            h = torch.relu(self.propagate(z.reshape(z.shape[0], -1)).reshape_as(z) + b)
        n, _, d = h.shape
        h = self.propagate(h.reshape(n, t * d)).reshape(n, t, d)
        feats = h[node_ids, torch.arange(t, device=node_ids.device).unsqueeze(1)]  # [T, M, d]
        w, b = params["head.weight"], params["head.bias"]
        out = torch.baddbmm(b.unsqueeze(1), _dropout(feats, self.dropout, self.training), w.transpose(1, 2))
        return (out, feats) if return_features else out

    def extra_repr(self) -> str:
        return f"num_nodes={self.num_nodes}, sparse={self.adjacency.is_sparse}, dropout={self.dropout}"


def _coalesce(t: torch.Tensor) -> torch.Tensor:
    return t.coalesce() if t.layout == torch.sparse_coo else t


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # torch.sparse.mm differentiates w.r.t. the dense operand (twice, for second-order MAML).
    return torch.sparse.mm(a, b) if a.is_sparse else a @ b


def _dropout(h: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if p == 0.0 or not training:
        return h
    if h.is_sparse:  # drop stored entries only (Kipf & Welling's sparse_dropout)
        h = h.coalesce()
        return torch.sparse_coo_tensor(h.indices(), F.dropout(h.values(), p, True), h.shape,
                                       check_invariants=False, is_coalesced=True)
    return F.dropout(h, p, True)


def _check_ids(node_ids: torch.Tensor) -> None:
    # dtype only: a range check would cost a host sync per forward (and break under vmap/compile); indexing
    # raises on its own for ids >= N.
    if node_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"GCN takes integer node ids, got dtype {node_ids.dtype}: pass a task's support_x/query_x")


@register("gcn")
def gcn(benchmark: Any, out_dim: int, hidden: int | Sequence[int] = 16, dropout: float = 0.0) -> GCN:
    """``model.name = "gcn"``: :class:`GCN` over a graph benchmark's graph; ``model.kwargs``: hidden, dropout."""
    graph = getattr(benchmark, "graph", None) if not isinstance(benchmark, Mapping) else benchmark.get("graph")
    if graph is None:
        raise ConfigError(f"model.name=gcn needs a graph benchmark (cora, citeseer), got {bench_name(benchmark)}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.kwargs.dropout: a probability in [0, 1), got {dropout}")
    hidden = hidden if isinstance(hidden, int) else tuple(hidden)
    return GCN(graph.features, graph.adjacency, hidden=hidden, out_dim=out_dim, dropout=dropout)


__all__ = ["GCN"]
