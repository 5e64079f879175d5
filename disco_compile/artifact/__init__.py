"""Export artifacts: the format (manifest, schedule, JSON schemas), written whole and read back checked.

Shared by the compiler and the runtime, torch-free."""
