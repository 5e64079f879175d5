"""Op families: for each family of ops, its channel rule (analysis) and its lowering (per-node programs), side by side and registered once (registry.py)."""
