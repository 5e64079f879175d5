"""Backend: hardened DISCO model -> per-node programs (lower) -> stages cut at every wait -> ONNX files and schedule."""
