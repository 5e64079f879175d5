"""Two small bundled tasks for examples, tests and benchmarks, built from data
that ships inside packages (nothing is downloaded):

- digits: sklearn's 1,797 labelled 8x8 handwritten digits, scaled to [0, 1],
  split by a seeded permutation into train / validation / test
  (1,197 / 300 / 300). Metric: top-1 accuracy.
- super-resolution (x2 or x4): colour photos bundled with scikit-image.
  Training crops come from astronaut, coffee, rocket, hubble_deep_field and
  immunohistochemistry, validation crops from retina, test crops from chelsea
  (a photo no training crop comes from). The low-resolution input is the
  high-resolution crop shrunk by bicubic interpolation with antialiasing.
  Metric: PSNR in dB over [0, 1] pixels, averaged over crops.

Each task comes with a small network to train as "the original model":
`DigitsNet` (Conv-BN-ReLU blocks, global pooling, Linear) and `SRNet`
(ESPCN-style: convolutions then PixelShuffle, plus the bicubic upsampling of
the input, so the network learns the residual detail).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

SR_TRAIN = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
SR_VAL = ("retina",)
SR_TEST = ("chelsea",)


@dataclass
class Task:
    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    metric: str  # "accuracy %" or "PSNR dB"

    @property
    def example(self) -> torch.Tensor:
        return self.train.tensors[0][:1]


class DigitsNet(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*block(1, width), *block(width, width), nn.MaxPool2d(2),
                                      *block(width, 2 * width), *block(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class SRNet(nn.Module):
    def __init__(self, scale: int = 4, width: int = 32, channels: int = 3):
        super().__init__()
        self.scale = scale
        self.body = nn.Sequential(nn.Conv2d(channels, width, 5, padding=2), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, channels * scale * scale, 3, padding=1))
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return up + self.shuffle(self.body(x))


def digits(seed: int = 0) -> Task:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, va, te = order[:1197], order[1197:1497], order[1497:]
    return Task("digits", TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va]), TensorDataset(x[te], y[te]),
                "accuracy %")


def _photo(name: str) -> torch.Tensor:
    import skimage.data
    return torch.tensor(getattr(skimage.data, name)()[..., :3], dtype=torch.float32).permute(2, 0, 1) / 255.0


def _crops(names: tuple[str, ...], count: int, size: int, g: torch.Generator) -> torch.Tensor:
    photos = [_photo(n) for n in names]
    out = []
    for k in range(count):
        p = photos[k % len(photos)]
        top = int(torch.randint(0, p.shape[1] - size + 1, (), generator=g))
        left = int(torch.randint(0, p.shape[2] - size + 1, (), generator=g))
        out.append(p[:, top:top + size, left:left + size])
    return torch.stack(out)


def shrink(hr: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(hr, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def super_resolution(scale: int = 4, lr_size: int = 12, train_crops: int = 2048, eval_crops: int = 256,
                     seed: int = 0) -> Task:
    if scale not in (2, 4):
        raise ValueError(f"super-resolution scale must be 2 or 4, got {scale}")
    g = torch.Generator().manual_seed(seed)
    size = lr_size * scale
    parts = []
    for names, count in ((SR_TRAIN, train_crops), (SR_VAL, eval_crops), (SR_TEST, eval_crops)):
        hr = _crops(names, count, size, g)
        parts.append(TensorDataset(shrink(hr, scale), hr))
    return Task(f"super-resolution x{scale}", *parts, metric="PSNR dB")


def train_original(model: nn.Module, task: Task, steps: int, batch_size: int = 64, lr: float = 3e-3,
                   seed: int = 0) -> nn.Module:
    """Supervised training of the original model (Adam, cosine-decayed learning rate); returns it in eval mode."""
    from .data import batches, loader
    from .distill import Loss
    torch.manual_seed(seed)
    loss_fn = Loss(dense="l1")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    stream = batches(loader(task.train, batch_size, shuffle=True, seed=seed))
    for _ in range(steps):
        x, y = next(stream)
        loss = loss_fn.task(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()
