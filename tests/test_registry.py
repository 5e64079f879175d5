"""The op registry refuses what would let the analysis accept an op that export cannot lower."""
import pytest
import torch

from disco_compile.ops import registry
from disco_compile.ops.registry import Family, RegistryError


@pytest.fixture
def empty_registry(monkeypatch):
    """A registry of its own for the test, so that nothing registered here reaches the package's."""
    monkeypatch.setattr(registry, "FAMILIES", [])
    monkeypatch.setattr(registry, "_OPS", {})
    monkeypatch.setattr(registry, "_ATEN", {})


def _rule(ctx):
    return None


def test_a_family_without_a_lowering_is_refused(empty_registry):
    Family("half").ops(torch.erfc, rule=_rule)
    with pytest.raises(RegistryError, match="half registers 1 ops for analysis but has no lowering"):
        registry.check()


def test_a_family_with_its_lowering_passes(empty_registry):
    family = Family("whole")
    family.ops(torch.erfc, rule=_rule)
    family.lowers(lambda b, n, module, op: None)
    registry.check()
    assert registry.registered()[torch.erfc].family is family


def test_an_op_registered_twice_is_refused(empty_registry):
    Family("first").ops(torch.erfc, rule=_rule)
    with pytest.raises(RegistryError, match="registered twice: by first and second"):
        Family("second").ops(torch.erfc, rule=_rule)


def test_an_aten_raising_to_an_unregistered_target_is_refused(empty_registry):
    with pytest.raises(RegistryError, match="raises to"):
        Family("raising").ops(torch.erfc, rule=_rule, aten={torch.ops.aten.erf.default: torch.erf})


def test_two_lowerings_are_refused(empty_registry):
    family = Family("twice")
    family.lowers(lambda b, n, module, op: None)
    with pytest.raises(RegistryError, match="two lowerings"):
        family.lowers(lambda b, n, module, op: None)


def test_the_package_registry_is_consistent():
    registry.check()
    raised = registry.aten_raising()
    assert all(target in registry.registered() for target in raised.values())
    assert {op.family.name for op in registry.registered().values()} == {f.name for f in registry.FAMILIES} - {
        "replicate"}
