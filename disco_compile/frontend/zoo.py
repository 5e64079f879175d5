"""torchvision models with random weights, made numerically sane for tests,
benchmarks and the built-in example (nothing is downloaded).

A randomly initialised network's BatchNorm running statistics (mean 0, var 1)
do not match its activations, so outputs drift to 1e-9 or 1e11 with depth.
`calibrate_batchnorm` runs a few random batches in training mode with
cumulative averaging (momentum=None), so the running statistics become the
true ones and activations stay near unit scale, as in a trained model.

Parameters of two or more dims that a builder initialises to all zeros (ViT's
class token and classifier head) are redrawn from N(0, 0.02^2): with a zero
classifier every output is 0 and any comparison of outputs is vacuous.
ViTs are built for the requested input side (`image_size`); their default
is 224.

Detection models (`build_detection`) do not trace whole (their pre- and
post-processing hold data-dependent control flow); DISCO splits their
backbone (`transform(..., submodule="backbone")`). They are built without
downloads (weights=None, weights_backbone=None), their resize step set to the
requested side (R-CNN, RetinaNet, FCOS: min_size = max_size = side; SSD keeps
its fixed 300 or 320), and their score threshold lowered to 0.001: with random
weights the class scores sit near 1/classes (softmax) or the 0.01 prior
(sigmoid), below the default 0.05, and no box would be returned. Only the
backbone's BatchNorm statistics are calibrated, on images after the model's
own transform: in training mode the detector wants targets.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from ..budget import batchnorm

# Input side length. Below 128 the last feature maps of most networks are 2x2 or smaller, the calibrated
# BatchNorm statistics come from a handful of values, and the model's own fp32 rounding error (against a
# float64 evaluation) reaches 2e-5 absolute on regnet_x_400mf: above the 1e-5 the equivalence tests demand.
DEFAULT_SIZE = 128
_EXTRA_KWARGS = {"inception_v3": {"aux_logits": False, "init_weights": True},
                 "googlenet": {"aux_logits": False, "init_weights": True}}
_SEGMENTATION_KWARGS = {"weights_backbone": None}  # the builders' default downloads ImageNet backbone weights
_IMAGE_SIZE_MODELS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")  # VisionTransformer(image_size=...)


def classification_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def segmentation_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models.segmentation))


def detection_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models.detection))


def calibrate_batchnorm(model: nn.Module, example: torch.Tensor, batches: int = 2, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    shape = (8,) + tuple(example.shape[1:])
    batchnorm.recalibrate(model, (torch.randn(shape, generator=g) for _ in range(batches)))
    return model


@torch.no_grad()
def redraw_zero_parameters(model: nn.Module, std: float = 0.02) -> nn.Module:
    for p in model.parameters():
        if p.dim() >= 2 and not p.any():
            p.normal_(0.0, std)
    return model


def build(name: str, size: int | None = None, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A torchvision model by name with calibrated random weights, and an example input (batch 1)."""
    builder = torchvision.models.get_model_builder(name)
    torch.manual_seed(seed)
    extra = _SEGMENTATION_KWARGS if name in segmentation_models() else _EXTRA_KWARGS.get(name, {})
    side = size or DEFAULT_SIZE
    if name in _IMAGE_SIZE_MODELS:
        extra = {**extra, "image_size": side}
    model = builder(weights=None, **extra)
    redraw_zero_parameters(model)
    example = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed + 1))
    return calibrate_batchnorm(model, example, seed=seed), example


def _detection_kwargs(name: str, side: int) -> dict:
    if name.startswith("ssd"):
        return {"score_thresh": 0.001}
    kwargs = {"min_size": side, "max_size": side}
    thresh = "box_score_thresh" if "rcnn" in name else "score_thresh"
    return {**kwargs, thresh: 0.001}


def build_detection(name: str, size: int | None = None, seed: int = 0) -> tuple[nn.Module, list[torch.Tensor]]:
    """A torchvision detection model by name with calibrated random weights (backbone BatchNorm), and an
    example input: a list of one RGB image in [0, 1] of side `size` (default DEFAULT_SIZE)."""
    side = size or DEFAULT_SIZE
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **_detection_kwargs(name, side))
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    calibration = [model.transform([torch.rand(3, side, side, generator=g) for _ in range(8)])[0].tensors
                   for _ in range(2)]
    batchnorm.recalibrate(model.backbone, calibration)
    model.eval()
    return model, [torch.rand(3, side, side, generator=g)]
