"""Speed kernels for model types: task-batched forwards registered with :func:`metagrad.functional.register_batched`.

The models stay plain modules; a kernel here runs one model type's T tasks in fewer, larger operator calls and
must equal that model's per-task forward (tests/test_batched.py). Importing this package registers them
(``metagrad`` imports it); the dependency runs from here to ``models`` and ``functional``, never back.
"""

from . import conv4, tnet

__all__ = ["conv4", "tnet"]
