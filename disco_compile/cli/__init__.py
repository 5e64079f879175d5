"""Command lines: disco-compile (compile.py) and disco-run (run.py, torch-free).

`compile_main` is the disco-compile entry point: on a device (the plain install, without torch) it says which
install the compiler needs instead of failing on `import torch`; `disco-compile plan ...` is the planner (plan.py).
"""
import sys
from importlib.util import find_spec

COMPILE_EXTRA = "pip install 'disco-compile[compile]'"


def compile_main() -> None:
    """disco-compile: cli/compile.py's command, where torch and torchvision are installed."""
    absent = [name for name in ("torch", "torchvision") if find_spec(name) is None]
    if absent:
        sys.stderr.write(f"Error: disco-compile needs {' and '.join(absent)}, which this install lacks (the plain "
                         f"install is the device runtime, disco-run); install the compiler with {COMPILE_EXTRA}\n")
        sys.exit(2)
    if sys.argv[1:2] == ["plan"]:
        from .plan import plan
        plan(args=sys.argv[2:], prog_name="disco-compile plan")
        return
    from .compile import main
    main()
