"""The package stays readable: no module over 600 lines, no function over cyclomatic complexity 25 (radon), and
the runtime side imports nothing of the compiler (artifact/, runtime/ and cli/run.py stay torch-free: that is
tested in test_runtime.py)."""
from pathlib import Path

import pytest
from radon.complexity import cc_visit

PACKAGE = Path(__file__).resolve().parent.parent / "disco_compile"
MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_module_is_short_and_its_functions_simple(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 600, f"{path.name}: {len(text.splitlines())} lines; split it by concern"
    complex_ = [(b.fullname, b.complexity) for b in cc_visit(text) if b.complexity > 25]
    assert not complex_, f"{path.name}: cyclomatic complexity over 25: {complex_}"
