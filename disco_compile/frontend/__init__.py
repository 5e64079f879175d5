"""Frontend: models as users bring them -> a torch.fx GraphModule (fx capture, torch.export programs raised back to layers, submodules, torchvision names)."""
