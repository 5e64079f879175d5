"""timeline(): stages and messages of a schedule laid out in time, checked on hand-computed schedules and,
as properties, on a real export's schedule with random stage times."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import two_exchange_mlp
from disco_compile import Budget, export, transform
from disco_compile.artifact.bundle import load_bundle
from disco_compile.artifact.schedule import Message, Schedule, Stage, StageInput, StageOutput
from disco_compile.runtime.timeline import timeline


def _message(id_, src, dst, nbytes, src_stage, dst_stage):
    return Message(id_, src, dst, "exchange", "t", [0], ["batch", 1], "float32", nbytes, src_stage, dst_stage)


def _stage(index, reads=(), sends=()):
    return Stage(index, f"node/stage{index}.onnx", [StageInput(r, "message", r) for r in reads],
                 [StageOutput(s, "message", s) for s in sends])


def _schedule(messages, programs):
    return Schedule(1, len(programs), [], [], "", messages, programs)


def ping_pong():
    """Node 0: stage 0 sends a (100 bytes) to node 1, stage 1 reads b. Node 1: stage 0 reads a, sends b (50)."""
    return _schedule([_message("a", 0, 1, 100, 0, 0), _message("b", 1, 0, 50, 0, 1)],
                     [[_stage(0, sends=["a"]), _stage(1, reads=["b"])], [_stage(0, reads=["a"], sends=["b"])]])


def test_ping_pong_by_hand():
    t = timeline(ping_pong(), [[1.0, 2.0], [3.0]], rate=100.0, latency=0.5)
    # a: produced at 1, on the link 1 s, arrives 2.5; node 1 runs 2.5-5.5; b: 0.5 s on the link, arrives 6.5
    assert t.arrival == {"a": 2.5, "b": 6.5}
    assert t.stage_end == {(0, 0): 1.0, (1, 0): 5.5, (0, 1): 8.5}
    assert t.latency == 8.5
    assert t.waiting == [5.5, 2.5]
    assert t.link_busy == {(0, 1): 1.0, (1, 0): 0.5}
    wire = timeline(ping_pong(), [[1.0, 2.0], [3.0]], rate=100.0, wire=2.0, batch=3)  # 6x the time on the link
    assert wire.arrival == {"a": 7.0, "b": 13.0} and wire.latency == 15.0


def test_without_a_link_the_latency_is_the_critical_path():
    assert timeline(ping_pong(), [[1.0, 2.0], [3.0]]).latency == 6.0
    assert timeline(ping_pong(), [[1.0, 2.0], [3.0]], latency=0.25).latency == 6.5


def test_a_link_carries_one_message_at_a_time_in_the_order_sent():
    # node 0's stage 0 sends a1 then a2 (100 bytes each); node 1's only stage reads a2: it waits for both
    s = _schedule([_message("a1", 0, 1, 100, 0, 1), _message("a2", 0, 1, 100, 0, 0)],
                  [[_stage(0, sends=["a1", "a2"])], [_stage(0, reads=["a2"]), _stage(1, reads=["a1"])]])
    t = timeline(s, [[1.0], [1.0, 1.0]], rate=100.0)
    assert t.arrival == {"a1": 2.0, "a2": 3.0}
    assert t.stage_end == {(0, 0): 1.0, (1, 0): 4.0, (1, 1): 5.0}
    assert t.link_busy == {(0, 1): 2.0}


def test_refuses_what_cannot_run():
    with pytest.raises(ValueError, match=r"stage_seconds has \[2, 2\] stages per node, the schedule \[2, 1\]"):
        timeline(ping_pong(), [[1.0, 2.0], [3.0, 1.0]])
    with pytest.raises(ValueError, match="rate must be above 0"):
        timeline(ping_pong(), [[1.0, 2.0], [3.0]], rate=0.0)
    deadlock = _schedule([_message("a", 0, 1, 4, 0, 0), _message("b", 1, 0, 4, 0, 0)],
                         [[_stage(0, reads=["b"], sends=["a"])], [_stage(0, reads=["a"], sends=["b"])]])
    with pytest.raises(ValueError, match=r"cannot run: nodes \{0: 0, 1: 0\}"):
        timeline(deadlock, [[1.0], [1.0]])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = two_exchange_mlp()
    dm = transform(model, 2, torch.randn(1, 4)).eval()
    dm.set_budget(Budget(0.5, allocation="uniform", align=1))
    out = tmp_path_factory.mktemp("timeline") / "out"
    export(dm, out)
    return load_bundle(out).schedule


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), rate=st.floats(1.0, 1e6), latency=st.floats(0.0, 1.0))
def test_bounds_of_an_exported_schedule(exported, data, rate, latency):
    seconds = [data.draw(st.lists(st.floats(0.0, 10.0), min_size=len(p), max_size=len(p)))
               for p in exported.programs]
    t = timeline(exported, seconds, rate=rate, latency=latency)
    # no node computes faster than its stages one after another, no link carries faster than its rate
    assert t.latency >= max(sum(s) for s in seconds) - 1e-9
    per_direction = {}
    for m in exported.messages:
        per_direction[(m.src, m.dst)] = per_direction.get((m.src, m.dst), 0) + m.bytes
    assert t.latency >= max(per_direction.values()) / rate + latency - 1e-9
    assert t.link_busy == pytest.approx({k: v / rate for k, v in per_direction.items()})
    # every stage starts after what it reads has arrived and after its node's stage before it
    for k, program in enumerate(exported.programs):
        for stage in program:
            start = t.stage_end[(k, stage.index)] - seconds[k][stage.index]
            assert start >= t.stage_end.get((k, stage.index - 1), 0.0) - 1e-9
            for inp in stage.inputs:
                if inp.source == "message":
                    assert start >= t.arrival[inp.ref] - 1e-9
    # a faster link never makes it slower
    assert timeline(exported, seconds, rate=rate * 2, latency=latency).latency <= t.latency + 1e-9
    assert timeline(exported, seconds).latency <= t.latency + 1e-9
