"""Frontend: models as users bring them -> a torch.fx GraphModule: fx capture, torch.export programs raised back
to layers, submodules of models that do not trace whole, torchvision names, and model files (load.py)."""
