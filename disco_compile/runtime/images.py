"""Images as model inputs, with numpy and Pillow alone (a node running an export needs no torch).

An image of any size becomes a float32 array (3, H, W) for a model exported at H x W, as torchvision's
evaluation transforms for ImageNet models prepare it (Resize(round(min(H, W) * 8 / 7)), CenterCrop((H, W)),
ToTensor, Normalize(IMAGENET_MEAN, IMAGENET_STD)):

    s = round(min(H, W) * 8 / 7); the image resized (Pillow, bilinear) so that its shorter side is s and
    its longer side int(s * longer / shorter); where it is smaller than H x W, zeros added around it (half
    on each side, the odd one after); the centre H x W cut out (top = round((h - H) / 2), left likewise);
    x = (RGB / 255 - mean) / std, channels first.

The fine-tuning driver's validation images (data.py) use this same function, so a model evaluated
there sees what `disco-run --input FOLDER` feeds it. A folder of images is the images directly in it,
in name order.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def images_in(folder: Path) -> list[Path]:
    """The image files directly in `folder`, in name order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def prepare(image, size: tuple[int, int]) -> np.ndarray:
    """A Pillow image as the float32 array (3, H, W) an ImageNet model exported at `size` = (H, W) takes."""
    from PIL import Image
    h, w = size
    image = image.convert("RGB")
    s = round(min(h, w) * 8 / 7)
    iw, ih = image.size
    short, long = (iw, ih) if iw <= ih else (ih, iw)
    new_short, new_long = s, int(s * long / short)
    rw, rh = (new_short, new_long) if iw <= ih else (new_long, new_short)
    if (rw, rh) != (iw, ih):
        image = image.resize((rw, rh), Image.BILINEAR)
    rgb = np.asarray(image, dtype=np.uint8)
    pad_h, pad_w = max(h - rh, 0), max(w - rw, 0)
    rgb = np.pad(rgb, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
    top, left = round((rgb.shape[0] - h) / 2), round((rgb.shape[1] - w) / 2)
    x = rgb[top:top + h, left:left + w].astype(np.float32) / np.float32(255)
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def read_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """`prepare` of the image file `path`; DataError naming the file if it cannot be read."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return prepare(im, size)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image {path}: {exc}; remove or replace the file") from exc


def read_folder(folder: Path, size: tuple[int, int]) -> tuple[list[Path], np.ndarray]:
    """The images directly in `folder`, in name order, and their arrays stacked: (files, (n, 3, H, W))."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    files = images_in(folder)
    if not files:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files, np.stack([read_image(p, size) for p in files])
