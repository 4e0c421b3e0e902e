"""The bundled dataset: scikit-learn's handwritten digits, shaped like a small CIFAR.

fxprune's examples and tests need real images that ship with a dependency (no
downloads at run time). ``sklearn.datasets.load_digits`` has 1,797 real 8x8
grey-scale digits; they are upsampled once to the reference models' input size
and replicated to three channels so that CIFAR-style networks run unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset, get_worker_info

from fxprune.errors import ConfigError

__all__ = ["DataSplit", "digits_loaders"]

_NUM_CLASSES = 10
_DIGITS_MAX = 16.0  # load_digits pixel values are integers in 0..16


@dataclass
class DataSplit:
    """Train and test loaders plus what a compiler needs to know about the inputs."""

    train: DataLoader
    test: DataLoader
    num_classes: int
    input_shape: tuple[int, int, int]

    def example_inputs(self, batch: int = 1) -> tuple[Tensor]:
        """Real test images (not noise), so shape propagation and equivalence checks see typical values."""
        images = self.test.dataset.tensors[0]
        if not 1 <= batch <= len(images):
            raise ConfigError(f"example_inputs batch must be in 1..{len(images)}, got {batch}")
        return (images[:batch].clone(),)


class _RandomShift:
    """Collate function that translates every image of a batch by up to ``max_shift`` pixels.

    Works on the stacked batch tensor (one indexing op, not a Python loop per image).
    Borders are replicated so that a shift does not introduce a value the data never has.
    Draws come from a seeded generator in the main process; in a worker process they
    come from a generator seeded with the worker's seed, which the DataLoader derives
    from its own seeded generator, so runs stay reproducible with ``num_workers > 0``.
    """

    def __init__(self, max_shift: int, seed: int) -> None:
        self.max_shift = max_shift
        self.generator = torch.Generator().manual_seed(seed)
        self._worker_generator: tuple[int, torch.Generator] | None = None

    def _current_generator(self) -> torch.Generator:
        info = get_worker_info()
        if info is None:
            return self.generator
        if self._worker_generator is None or self._worker_generator[0] != info.seed:
            self._worker_generator = (info.seed, torch.Generator().manual_seed(info.seed))
        return self._worker_generator[1]

    def __call__(self, samples: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        images = torch.stack([image for image, _ in samples])
        labels = torch.stack([label for _, label in samples])
        n, _, h, w = images.shape
        s = self.max_shift
        generator = self._current_generator()
        dy = torch.randint(0, 2 * s + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * s + 1, (n,), generator=generator)
        padded = F.pad(images, (s, s, s, s), mode="replicate")
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
        batch_index = torch.arange(n)[:, None, None, None]
        channel_index = torch.arange(images.shape[1])[None, :, None, None]
        return padded[batch_index, channel_index, rows, cols], labels


def digits_loaders(
    image_size: int = 32,
    channels: int = 3,
    batch_size: int = 64,
    test_fraction: float = 0.2,
    seed: int = 0,
    num_workers: int = 0,
    augment: bool = False,
) -> DataSplit:
    """Stratified, seeded train/test loaders over the digits, resized and normalized up front.

    All preprocessing happens once on the whole tensor (the data set is tiny), so the
    loaders only index a ``TensorDataset``. Normalization uses the train split's
    statistics only, so no test information leaks into training. ``augment`` adds a
    random translation by up to 2 pixels to training batches (seeded by ``seed``).
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size must be a positive int, got {image_size!r}")
    if not isinstance(channels, int) or channels < 1:
        raise ConfigError(f"channels must be a positive int, got {channels!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers must be a non-negative int, got {num_workers!r}")

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / _DIGITS_MAX
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=test_fraction,
        random_state=seed,
        stratify=labels.numpy(),
    )
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    mean = images[train_idx].mean()
    std = images[train_idx].std()
    images = ((images - mean) / std).expand(-1, channels, -1, -1).contiguous()

    train_set = TensorDataset(images[train_idx], labels[train_idx])
    test_set = TensorDataset(images[test_idx], labels[test_idx])
    train_loader = DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        collate_fn=_RandomShift(max_shift=2, seed=seed) if augment else None,
    )
    test_loader = DataLoader(test_set, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return DataSplit(
        train=train_loader,
        test=test_loader,
        num_classes=_NUM_CLASSES,
        input_shape=(channels, image_size, image_size),
    )
