"""Semantic segmentation split across nodes; its shards exported and run with onnxruntime.

Builds a torchvision segmentation model (default deeplabv3_mobilenet_v3_large; --model picks any
of FCN, DeepLabV3 and LR-ASPP) with random weights and no auxiliary head (nothing is downloaded:
load your own trained weights with model.load_state_dict before `transform`), splits it, keeps a
fraction of the exchanged channels, prints the cost report, exports the per-node shards to a
temporary folder, runs them and compares their per-pixel class scores ({"out": N,21,H,W}) with the
DISCO model's (_pipeline.py says each step).

    python examples/segmentation.py [--model deeplabv3_mobilenet_v3_large] [--nodes 2] [--budget 0.2] [--size 224]
"""
import _pipeline
from disco_compile.frontend import zoo


def main(argv: list[str] | None = None) -> list[_pipeline.Comparison]:
    args = _pipeline.parser(__doc__, size=224, models=zoo.segmentation_models(),
                            model="deeplabv3_mobilenet_v3_large").parse_args(argv)
    model, x = zoo.build(args.model, args.size)
    comparisons = _pipeline.run(args.model, model, x, args)
    scores = comparisons[-1]
    same = (scores.shards["out"].argmax(1) == scores.disco["out"].argmax(1)).float().mean()
    print(f"pixels given the same class by the shards and the DISCO model: {100 * float(same):.2f} %")
    return comparisons


if __name__ == "__main__":
    main()
