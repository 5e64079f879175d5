"""Training data for fine-tuning: what a batch is, how batches are cycled and
shared out between processes, and image folders.

A batch is a tensor of inputs, or a pair (inputs, target) where the target is
class indices or a tensor like the model's output; (inputs,) and
(inputs, None) mean unlabelled. `batches(data, start, rank, world)` runs over
`data` again and again (a list, a DataLoader, any re-iterable): global batch n
goes to process n % world, and the first `start` steps are skipped, so a
resumed run sees the batches an uninterrupted one would have.

An image folder is either torchvision's ImageFolder layout (one subfolder per
class: labelled) or a folder of images (unlabelled).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..runtime import images
from ..errors import DataError

Batch = tuple[torch.Tensor, "torch.Tensor | None"]


def split_batch(batch) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 2 and isinstance(batch[0], torch.Tensor):
        target = batch[1] if len(batch) == 2 else None
        if target is None or isinstance(target, torch.Tensor):
            return batch[0], target
    raise DataError(f"a batch must be a tensor of inputs or a pair (inputs, target) of tensors; got "
                    f"{type(batch).__name__}" + (f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else ""))


def batches(data: Iterable, start: int = 0, rank: int = 0, world: int = 1) -> Iterator[Batch]:
    """This process's batches from step `start` on, cycling through `data` forever."""
    n = 0
    while True:
        epoch = 0
        for batch in data:
            epoch += 1
            if n >= start * world and n % world == rank:
                yield split_batch(batch)
            n += 1
        if epoch == 0:
            if n == 0:
                raise DataError("the training data gave no batches")
            raise DataError(f"the training data ran out after {n} batches and cannot be iterated again; "
                            f"pass a list, a DataLoader or another re-iterable")


class _Images(Dataset):
    """Images and optional class indices; a file that cannot be read is a DataError naming it."""

    def __init__(self, files: list[Path], labels: list[int] | None, transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, k: int):
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(self.files[k]) as im:
                x = self.transform(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"cannot read image {self.files[k]}: {e}; remove or replace the file") from e
        return x if self.labels is None else (x, self.labels[k])


def _scan(path) -> tuple[list[Path], list[int] | None]:
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist or is not a folder")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise DataError(f"data folder {folder} cannot be read (permissions)")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes:
        files, labels = [], []
        for k, c in enumerate(classes):
            found = images.images_in(folder / c)
            files += found
            labels += [k] * len(found)
    else:
        files, labels = images.images_in(folder), None
    if not files:
        raise DataError(f"data folder {folder} holds no images ({', '.join(images.IMAGE_SUFFIXES)}), neither directly "
                        f"nor in class subfolders")
    return files, labels


def _prepared(image, image_size: tuple[int, int]) -> torch.Tensor:
    return torch.from_numpy(images.prepare(image, image_size))


def _transform(image_size: tuple[int, int], train: bool):
    if not train:
        return functools.partial(_prepared, image_size=tuple(image_size))
    from torchvision import transforms as T
    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(images.IMAGENET_MEAN, images.IMAGENET_STD)])


def image_folder(path, image_size: tuple[int, int], train: bool) -> _Images:
    """The images under `path` as a dataset (labelled when arranged in class subfolders).

    Training: RandomResizedCrop to image_size and horizontal flips; otherwise
    `images.prepare` (resize the shorter side to 8/7 of the size and centre-crop,
    as disco-run prepares a folder of images). ImageNet normalisation, as
    torchvision's pretrained models expect."""
    files, labels = _scan(path)
    return _Images(files, labels, _transform(image_size, train))


def image_split(path, image_size: tuple[int, int], val_fraction: float, seed: int) -> tuple[_Images, _Images]:
    """(training, validation) datasets: a seeded `val_fraction` of the images held out, each side
    with its own transforms."""
    if not 0 < val_fraction < 1:
        raise DataError(f"the validation fraction must be between 0 and 1, got {val_fraction}")
    files, labels = _scan(path)
    n_val = max(1, round(len(files) * val_fraction))
    if n_val >= len(files):
        raise DataError(f"{len(files)} images are too few to hold out {val_fraction:.0%} for validation")
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    parts = []
    for idx, train in ((order[n_val:], True), (order[:n_val], False)):
        parts.append(_Images([files[k] for k in idx], None if labels is None else [labels[k] for k in idx],
                             _transform(image_size, train)))
    return parts[0], parts[1]


def loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, workers: int = 0) -> DataLoader:
    """Batches in an order fixed by `seed` alone (not by the global random state)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle and len(dataset) > batch_size,
                      generator=torch.Generator().manual_seed(seed), num_workers=workers,
                      persistent_workers=workers > 0)
