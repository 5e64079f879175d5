"""ResNet-50 image classification split across nodes; its shards exported and run with onnxruntime.

Builds torchvision's ResNet-50 with random weights (BatchNorm statistics calibrated on random
images; nothing is downloaded: load your own trained weights with model.load_state_dict before
`transform`), splits it, keeps a fraction of the exchanged channels, prints the cost report,
exports the per-node shards to a temporary folder, runs them and compares their logits with the
DISCO model's (_pipeline.py says each step).

    python examples/classify_resnet50.py [--nodes 2] [--budget 0.2] [--size 224]
"""
import _pipeline
from disco_compile.frontend import zoo


def main(argv: list[str] | None = None) -> list[_pipeline.Comparison]:
    args = _pipeline.parser(__doc__, size=224).parse_args(argv)
    model, x = zoo.build("resnet50", args.size)
    comparisons = _pipeline.run("resnet50", model, x, args)
    print(_pipeline.top_class(comparisons[-1]))
    return comparisons


if __name__ == "__main__":
    main()
