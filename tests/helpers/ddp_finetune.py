"""Run by torchrun in tests/test_finetune.py: fine-tune a small BatchNorm-free net with two
processes (gloo) and save the result from rank 0."""
import sys

import torch

from disco_compile import finetune, transform
from disco_compile.budget.distill import Loss


def setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(12)]
    return model, batches


def run(model, data):
    torch.set_num_threads(1)
    dm = transform(model, 2, data[0][:1])
    finetune(dm, data, budget=0.25, steps=6, lr=1e-2, loss=Loss(), progress=False, batchnorm_batches=0)
    return dm


if __name__ == "__main__":
    model, batches = setup()
    dm = run(model, batches)
    if torch.distributed.get_rank() == 0:
        torch.save(dm.state_dict(), sys.argv[1])
    torch.distributed.destroy_process_group()
