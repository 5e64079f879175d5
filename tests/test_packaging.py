"""The plain install is the device runtime: no torch among its dependencies, and the runtime, `disco-run info` and
the disco-compile entry point work (or say what to install) where torch cannot be imported."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPILER_ONLY = ("torch", "torchvision", "networkx", "tqdm", "scikit-learn", "scikit-image", "timm", "matplotlib")

# a sys.meta_path finder that makes `import torch` (and torchvision) fail, as on a device without them
BLOCK_TORCH = textwrap.dedent("""
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None
    sys.meta_path.insert(0, _NoTorch())
""")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()


def test_plain_install_pulls_no_compiler_dependency():
    project = _project()
    base = {_name(r) for r in project["dependencies"]}
    assert base == {"onnx", "onnxruntime", "numpy", "click", "jsonschema", "pyzmq", "pyyaml", "pillow"}
    assert not base & set(COMPILER_ONLY)
    compile_extra = {_name(r) for r in project["optional-dependencies"]["compile"]}
    assert {"torch", "torchvision"} <= compile_extra
    assert "torch==2.14.1" in project["optional-dependencies"]["compile"]


def _run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_runtime_and_info_without_torch(tmp_path):
    """disco_compile, its runtime, disco-run's info command and the bundle reader import with torch blocked."""
    done = _run_blocked("""
        import disco_compile, disco_compile.runtime, disco_compile.cli.info, disco_compile.artifact.info
        from disco_compile.runtime import run_local
        try:
            import torch
        except ModuleNotFoundError:
            print("no torch")
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")]
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no torch"


def test_disco_compile_without_torch_names_the_install():
    done = _run_blocked("""
        import disco_compile.cli as cli
        found = cli.find_spec
        cli.find_spec = lambda name: None if name in ("torch", "torchvision") else found(name)  # as on a device
        cli.compile_main()
    """)
    assert done.returncode == 2
    assert "pip install 'disco-compile[compile]'" in done.stderr and "torch and torchvision" in done.stderr


def test_ci_tests_the_readme_command_and_the_plain_install():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv") and "pytest" in line]
    assert len(commands) == 1 and "'.[compile,test]'" in commands[0], commands
    assert commands[0] in ci
    assert ".ci/device_check.sh" in ci and (ROOT / ".ci" / "device_check.sh").is_file()
