"""Vision Transformer (ViT-B/16) split across nodes by attention heads; its shards exported and run.

Builds torchvision's vit_b_16 (or --model vit_b_32) with random weights (nothing is downloaded:
load your own trained weights with model.load_state_dict before `transform`). Each node owns
whole attention heads and a share of every projection's and MLP's channels; LayerNorm's
per-token statistics are all-reduced between nodes (the ungated exchange bytes of the report).
The script splits the model, keeps a fraction of the exchanged channels, prints the cost report,
exports the per-node shards to a temporary folder, runs them and compares their logits with the
DISCO model's (_pipeline.py says each step). --size must be a multiple of the patch size (16 or
32); the model is built for that side.

    python examples/vit.py [--model vit_b_16] [--nodes 2] [--budget 0.2] [--size 224]
"""
import _pipeline
from disco_compile.frontend import zoo

MODELS = ["vit_b_16", "vit_b_32"]


def main(argv: list[str] | None = None) -> list[_pipeline.Comparison]:
    args = _pipeline.parser(__doc__, size=224, models=MODELS, model="vit_b_16").parse_args(argv)
    model, x = zoo.build(args.model, args.size)  # built for that side (its position embedding fixes it)
    comparisons = _pipeline.run(args.model, model, x, args)
    print(_pipeline.top_class(comparisons[-1]))
    return comparisons


if __name__ == "__main__":
    main()
