"""The learners, peers behind one protocol (:mod:`metagrad.learners.base`): MAML (with ANIL, BOIL, Meta-SGD,
T-Net as its settings or models) and ProtoNet. ``available()`` lists their keys, ``learner_class(key)`` gives one.
"""

from .base import Learner, MetaLossOutput, available, learner_class, register
from .maml import MAML
from .protonet import ProtoNet, embedding_of

__all__ = ["MAML", "Learner", "MetaLossOutput", "ProtoNet", "available", "embedding_of", "learner_class",
           "register"]
