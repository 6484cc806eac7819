"""Kept as an import path: the MAML learner lives in :mod:`metagrad.learners.maml`."""

from .learners.base import MetaLossOutput
from .learners.maml import MAML

__all__ = ["MAML", "MetaLossOutput"]
