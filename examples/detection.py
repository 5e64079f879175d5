"""Object detection with the backbone split across nodes; the backbone's shards exported and run.

Builds a torchvision detector (default fasterrcnn_mobilenet_v3_large_fpn; --model picks among the
Faster R-CNN, RetinaNet, FCOS and SSDlite families) with random weights (nothing is downloaded:
load your own trained weights with model.load_state_dict before `transform`; the score threshold
is lowered to 0.001 so that random weights still give boxes). A detector does not trace whole: its
pre- and post-processing branch on data. So `transform(..., submodule="backbone")` splits the
backbone with its FPN, which holds most of the compute, and the rest of the detector runs whole on
node 0. The cost report is the backbone's. The backbone's shards are exported to a temporary
folder and run in place of the backbone (`with_bundle`), the rest of the detector in PyTorch; the
script compares the backbone's outputs (FPN levels) and the detections with the DISCO detector's
(_pipeline.py says each step).

With random weights many boxes score alike, so top-k and NMS are ill-conditioned: a rounding-level
difference in the FPN levels can swap two tied detections (tests/test_submodule.py); the FPN levels
are the well-conditioned check.

    python examples/detection.py [--model fasterrcnn_mobilenet_v3_large_fpn] [--nodes 2] [--budget 0.2] [--size 320]

--size is the side of the input image and of the detector's resize step (min_size = max_size);
SSDlite resizes to its fixed 320 whatever the input side.
"""
import torch

import _pipeline
from disco_compile.frontend import zoo

FAMILIES = ("fasterrcnn", "retinanet", "fcos", "ssdlite")


def main(argv: list[str] | None = None) -> list[_pipeline.Comparison]:
    models = [m for m in zoo.detection_models() if m.startswith(FAMILIES)]
    args = _pipeline.parser(__doc__, size=320, models=models,
                            model="fasterrcnn_mobilenet_v3_large_fpn").parse_args(argv)
    model, images = zoo.build_detection(args.model, args.size)
    comparisons = _pipeline.run(args.model, model, images, args, submodule="backbone")
    shards, disco = comparisons[-1].shards[0], comparisons[-1].disco[0]
    k = min(len(shards["boxes"]), len(disco["boxes"]))
    same = (torch.isclose(shards["boxes"][:k], disco["boxes"][:k], rtol=1e-4, atol=1e-5).all(1)
            & torch.isclose(shards["scores"][:k], disco["scores"][:k], rtol=1e-4, atol=1e-5)
            & (shards["labels"][:k] == disco["labels"][:k]))
    print(f"detections: shards {len(shards['boxes'])}, DISCO detector {len(disco['boxes'])}; the same box, score "
          f"and label at the same rank: {int(same.sum())}; top scores "
          f"{', '.join(f'{v:.4f}' for v in shards['scores'][:3].tolist())}")
    return comparisons


if __name__ == "__main__":
    main()
