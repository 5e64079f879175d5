"""Command lines: disco-compile (compile.py) and disco-run (run.py, torch-free)."""
