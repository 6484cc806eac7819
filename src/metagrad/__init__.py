"""metagrad: optimisation-based few-shot meta-learning.

MAML as one small bi-level loop on plain PyTorch modules, ProtoNet beside it behind the same learner protocol,
and published improvements to them as composable plug-ins at named seams.

Example:
    >>> import metagrad
    >>> from metagrad import MAML, models
    >>> bench = metagrad.data.create("sinusoid", "train", shots=10, queries=10, meta_batch_size=25, seed=0)
    >>> learner = MAML(models.MLP(1, (40, 40), 1), inner_lr=0.01, loss="mse")
    >>> out = learner.meta_loss(bench.batch(0)); out.loss.backward()
    >>> out = metagrad.meta_backward(learner, bench.batch(1))    # the same gradients, bounded memory
"""

from . import batched, data, methods, models  # batched: registers the models' task-batched forwards
from .build import load
from .chunks import meta_backward
from .learners import MAML, MetaLossOutput, ProtoNet
from .seams import InnerContext, LearnerView, OuterContext, Plugin
from .tasks import TaskBatch

__version__ = "0.1.0"

__all__ = [
           "MAML",
           "InnerContext",
           "LearnerView",
           "MetaLossOutput",
           "OuterContext",
           "Plugin",
           "ProtoNet",
           "TaskBatch",
           "__version__",
           "batched",
           "data",
           "load",
           "meta_backward",
           "methods",
           "models",
]
