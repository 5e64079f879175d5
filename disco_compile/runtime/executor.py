"""Running an export: one NodeExecutor per node, and `run_local` for all nodes in one process.

A NodeExecutor holds one onnxruntime session per stage of its node and runs the
stages in order. A stage's inputs come from the model inputs (node 0), from
values carried from earlier stages of the node, or from messages received
through the transport; its message outputs are sent as soon as the stage
returns, carried values are dropped after their last use, and node 0 returns
the model outputs. Every array produced for a message or model output is
checked against the schedule before it leaves the stage. A stage's own run is
bounded by the timeout too: it runs on a stage thread of the calling thread
(`_StageThread`; handing a stage over and back costs tens of microseconds) while
the caller waits at most `timeout` seconds; a stage that has not returned by
then is told to stop (onnxruntime's RunOptions.terminate, taken at the next
graph node), left to its thread, and the run fails with a StageFailure naming
the stage, so the node stops with an error instead of hanging. When a node fails it
tells its peers through the transport, so they stop instead of waiting.
`session_options` makes the onnxruntime options of those sessions; an
`on_stage` hook sees each stage's inputs and time (runtime/estimate.py times
stages with it).

`run_local` runs every node in a thread of this process with an InProcTransport:
the same messages, headers and checks as a run across machines.
"""
from __future__ import annotations

import hashlib
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from ..artifact.bundle import Bundle, load_bundle
from ..errors import (BundleError, InputMismatch, MessageError, NodeFailure, PeerFailed, PeerTimeout, ProviderError,
                      StageFailure)
from ..artifact.schedule import BATCH, Schedule, Stage, TensorSpec
from .transport import InProcHub, Transport, dtype_name

DEFAULT_TIMEOUT = 10.0  # seconds a node waits for one message
_STOP_GRACE = 5.0  # after a failure, how much longer than the timeout the other nodes get to stop


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _as_array(value, what: str) -> np.ndarray:
    torch = sys.modules.get("torch")  # torch is not needed to run an export; accept its tensors when loaded
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise InputMismatch(f"{what} is a {type(value).__name__}; give a numpy array or a torch.Tensor")


def check_inputs(schedule: Schedule, inputs) -> dict[str, np.ndarray]:
    """The model inputs by name, checked against `schedule.inputs`: count, dtype, and every dimension but the
    batch (the same in all inputs); an array in the other byte order is converted. `inputs`: one array or tensor, a
    sequence of them in the model's input order, or a mapping from input name."""
    specs = schedule.inputs
    given = _in_order(specs, inputs)
    arrays, batch = {}, None
    for spec, value in zip(specs, given, strict=True):
        what = f"input {spec.name!r}"
        a = _as_array(value, what)
        if not a.dtype.isnative:  # onnxruntime reads every buffer in the machine's byte order
            a = a.astype(a.dtype.newbyteorder("="))
        if dtype_name(a.dtype) != spec.dtype:
            raise InputMismatch(f"{what}: dtype {dtype_name(a.dtype)}, but the model was exported for {spec.dtype}; "
                                f"convert it first (x.astype(numpy.{spec.dtype}))")
        if a.ndim != len(spec.shape) or a.shape[1:] != tuple(spec.shape[1:]) or a.shape[0] < 1:
            raise InputMismatch(f"{what}: shape {_fmt(a.shape)}, but the model was exported for "
                                f"{_fmt(spec.shape)} ({BATCH!r}: any batch size of at least 1)")
        if batch is not None and a.shape[0] != batch:
            raise InputMismatch(f"{what}: batch {a.shape[0]}, but the first input has batch {batch}; "
                                f"all inputs need the same batch size")
        batch = a.shape[0]
        arrays[spec.name] = np.ascontiguousarray(a)
    return arrays


def _in_order(specs: list[TensorSpec], inputs) -> list:
    """`inputs` (one value, a sequence, or a mapping from input name) as a list in the order of `specs`."""
    names = ", ".join(repr(t.name) for t in specs)
    if isinstance(inputs, Mapping):
        missing = [t.name for t in specs if t.name not in inputs]
        unknown = [name for name in inputs if name not in {t.name for t in specs}]
        if missing or unknown:
            raise InputMismatch(f"the model's inputs are {names}; missing: {missing}, unknown: {unknown}")
        given = [inputs[t.name] for t in specs]
    elif isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)):
        given = list(inputs)
    else:
        given = [inputs]
    if len(given) != len(specs):
        raise InputMismatch(f"the model takes {len(specs)} input(s) ({names}), {len(given)} given")
    return given


_ARENA_LOCK = threading.Lock()
_ARENA_REGISTERED = False


def _register_shared_arena() -> None:
    """Register one arena allocator with onnxruntime's environment (once per process)."""
    global _ARENA_REGISTERED
    with _ARENA_LOCK:
        if not _ARENA_REGISTERED:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
            _ARENA_REGISTERED = True


def session_options(threads: int = 1, *, shared_arena: bool = True) -> ort.SessionOptions:
    """The onnxruntime options of NodeExecutor's sessions: `threads` intra-op threads, one inter-op thread,
    sequential execution, default graph optimisations, fatal log messages only (a failing stage raises
    StageFailure with the same text). `shared_arena`: the session draws on one CPU arena registered for the
    process (on first use) instead of an arena of its own."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 4
    if shared_arena:
        # one CPU arena for every stage session of the process, not one each: measured on ResNet-50 N=2
        # (docs/performance.md) a node's peak memory falls from 0.61 to 0.29 of the whole model's
        _register_shared_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    return options


_providers = ["CPUExecutionProvider"]  # the process's execution providers for stage sessions (use_providers)


def use_providers(names: Sequence[str]) -> list[str]:
    """Run every stage session of this process on onnxruntime execution providers `names`, in order of
    preference (short names as "cuda" or "tensorrt", or onnxruntime's own as "CUDAExecutionProvider"); the CPU
    provider is kept last, for the ops the others do not take. The full names in use; a name this onnxruntime
    build does not offer is a ProviderError listing those it does."""
    known = {p.lower().removesuffix("executionprovider"): p for p in ort.get_all_providers()}
    available = ort.get_available_providers()
    chosen = []
    for name in names:
        full = known.get(name.lower().removesuffix("executionprovider"))
        if full not in available:
            what = f"onnxruntime has no execution provider {name!r}" if full is None else \
                f"the execution provider {full} is not available in this onnxruntime build"
            raise ProviderError(f"{what}; available here: {', '.join(available)} (CUDA and TensorRT need the "
                                f"onnxruntime-gpu package and their libraries)")
        chosen.append(full)
    _providers[:] = list(dict.fromkeys([*chosen, "CPUExecutionProvider"]))
    return list(_providers)


_STOP = object()  # tells a stage thread to end


def _serve_stages(calls: queue.SimpleQueue, results: queue.SimpleQueue) -> None:
    """A stage thread: run each call from `calls`, putting (True, value) or (False, exception) on `results`."""
    while (call := calls.get()) is not _STOP:
        try:
            results.put((True, call()))
        except BaseException as exc:  # handed to the waiting caller, which raises it
            results.put((False, exc))


class _StageThread:
    """The thread that runs one calling thread's stages, so that the caller can stop waiting for one; it ends
    when this object is dropped (the calling thread ended) or abandoned (`run` timed out)."""

    def __init__(self, name: str):
        self._calls, self._results = queue.SimpleQueue(), queue.SimpleQueue()
        threading.Thread(target=_serve_stages, args=(self._calls, self._results), name=name, daemon=True).start()
        weakref.finalize(self, self._calls.put, _STOP)

    def run(self, call: Callable[[], object], timeout: float) -> tuple[bool, object]:
        """(True, what `call()` returned), raising what it raised; (False, None) if it did not return within
        `timeout` seconds (this stage thread is then abandoned: make another)."""
        self._calls.put(call)
        try:
            ok, value = self._results.get(timeout=timeout)
        except queue.Empty:
            self._calls.put(_STOP)  # taken once the stage returns, if it ever does
            return False, None
        if not ok:
            raise value
        return True, value


# on_stage(node, stage index, the stage's inputs by graph input name, seconds the stage took)
StageHook = Callable[[int, int, dict[str, np.ndarray], float], None]


class NodeExecutor:
    """Runs node `node`'s stages of `bundle`, exchanging messages through `transport`.

    `threads`: onnxruntime intra-op threads per session; `timeout`: seconds to
    wait for each message before PeerTimeout. `on_stage`, if given, is called
    after each stage of a `run` with the node, the stage's index, the arrays it
    was fed (by graph input name) and the seconds the stage took; `run_stage`
    runs a stage again on such feeds.
    """

    def __init__(self, bundle: Bundle, node: int, transport: Transport, *, threads: int = 1,
                 timeout: float = DEFAULT_TIMEOUT, on_stage: StageHook | None = None):
        if not 0 <= node < bundle.schedule.nodes:
            raise ValueError(f"node {node}: the export has nodes 0..{bundle.schedule.nodes - 1}")
        bundle.require(node)
        if threads < 1 or not timeout > 0:
            raise ValueError(f"threads must be at least 1 and timeout above 0, got threads={threads}, "
                             f"timeout={timeout}")
        self.bundle, self.node, self.transport, self.timeout = bundle, node, transport, timeout
        self.on_stage = on_stage
        schedule = bundle.schedule
        self._stages = schedule.programs[node]
        self._messages = {m.id: m for m in schedule.messages}
        self._outputs = {t.name: t for t in schedule.outputs}
        options = session_options(threads)
        self.sessions = [self._session(stage, options) for stage in self._stages]  # one per stage, in order
        # graph outputs to fetch per stage (one graph output may serve several roles)
        self._fetch = [list(dict.fromkeys(o.name for o in stage.outputs)) for stage in self._stages]
        self._drop_after = _drop_after(self._stages)
        self._stage_threads = threading.local()  # .thread: the _StageThread of the calling thread

    def _where(self, stage: Stage) -> str:
        return f"node {self.node} stage {stage.index} ({stage.file})"

    def _session(self, stage: Stage, options: ort.SessionOptions) -> ort.InferenceSession:
        path = self.bundle.path(stage)
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"{self._where(stage)}: cannot read the stage file ({exc}); re-export") from exc
        if hashlib.sha256(content).hexdigest() != self.bundle.manifest.files[stage.file]:
            raise BundleError(f"{stage.file}: sha256 mismatch, the file was changed after export; re-export")
        try:
            return ort.InferenceSession(content, options, providers=_providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"{self._where(stage)}: onnxruntime cannot load the stage graph ({exc})") from exc

    def run(self, inputs=None) -> dict[str, np.ndarray] | None:
        """Run this node's stages once. Node 0 takes the model inputs (see `check_inputs`) and returns the
        model outputs by name; other nodes take None and return None, or, when the export has the inputs on
        all nodes (schedule.inputs_on_all_nodes), their own inputs. On failure, peers are told to stop."""
        try:
            own = self.bundle.schedule.inputs_on_all_nodes
            if self.node != 0 and own and inputs is None:
                raise InputMismatch(f"node {self.node} takes its own model inputs: the export has them on every "
                                    f"node (compiled with the input on all nodes); pass them")
            if self.node == 0 or own:
                model_inputs = check_inputs(self.bundle.schedule, inputs)
            elif inputs is not None:
                raise InputMismatch(f"node {self.node} takes no model inputs (node 0 sends them); pass None")
            else:
                model_inputs = {}
            return self._run(model_inputs)
        except PeerFailed:
            raise  # a peer failed: it has told everyone already
        except BaseException as exc:
            self.transport.abort(f"{type(exc).__name__}: {exc}")
            raise

    def run_stage(self, index: int, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run stage `index` of this node alone on `feeds` (graph input name -> array); its graph outputs by
        name. Receives, sends and checks nothing: `run` does that around it. A stage that does not return within
        the timeout is told to stop and raises StageFailure (see the module docstring)."""
        fetch, session, options = self._fetch[index], self.sessions[index], ort.RunOptions()
        stage_thread = getattr(self._stage_threads, "thread", None)
        if stage_thread is None:
            stage_thread = self._stage_threads.thread = _StageThread(f"disco-stages-node{self.node}")
        try:
            returned, values = stage_thread.run(lambda: session.run(fetch, feeds, options), self.timeout)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise StageFailure(f"{self._where(self._stages[index])}: onnxruntime failed: {exc}") from exc
        if not returned:
            options.terminate = True
            self._stage_threads.thread = None
            raise StageFailure(f"{self._where(self._stages[index])}: the stage did not return within "
                               f"{self.timeout:g} s (the timeout), so it was stopped; if the stage is only that "
                               f"slow, give a longer timeout (run_local(timeout=...), disco-run --timeout)")
        return dict(zip(fetch, values, strict=True))

    def _run(self, model_inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        batch = next((a.shape[0] for a in model_inputs.values()), None)
        carried: dict[str, np.ndarray] = {}
        model_outputs: dict[str, np.ndarray] = {}
        for index, (stage, drop) in enumerate(zip(self._stages, self._drop_after, strict=True)):
            feeds, batch = self._feeds(stage, model_inputs, carried, batch)
            start = time.perf_counter()
            values = self.run_stage(index, feeds)
            seconds = time.perf_counter() - start
            self._hand_out(stage, values, carried, model_outputs, batch)
            if self.on_stage is not None:
                self.on_stage(self.node, index, feeds, seconds)
            for ref in drop:
                carried.pop(ref, None)
        return model_outputs if self.node == 0 else None

    def _feeds(self, stage: Stage, model_inputs: dict[str, np.ndarray], carried: dict[str, np.ndarray],
               batch: int | None) -> tuple[dict[str, np.ndarray], int | None]:
        """The inputs of `stage` by graph input name (waiting for its messages), and the run's batch size."""
        feeds = {}
        for inp in stage.inputs:
            if inp.source == "model_input":
                feeds[inp.name] = model_inputs[inp.ref]
            elif inp.source == "carried":
                feeds[inp.name] = carried[inp.ref]
            else:
                msg = self._messages[inp.ref]
                payload = self.transport.recv(msg, self.timeout)
                if batch is not None and payload.shape[0] != batch:
                    raise MessageError(f"message {msg.id!r} from node {msg.src}: batch {payload.shape[0]}, "
                                       f"but this run's batch is {batch}")
                batch = payload.shape[0]
                feeds[inp.name] = payload
        return feeds, batch

    def _hand_out(self, stage: Stage, values: dict[str, np.ndarray], carried: dict[str, np.ndarray],
                  model_outputs: dict[str, np.ndarray], batch: int | None) -> None:
        """Send, carry or return each output of `stage`, messages first: the peers are waiting for them."""
        for out in sorted(stage.outputs, key=lambda o: o.role != "message"):
            value = values[out.name]
            if out.role == "message":
                msg = self._messages[out.ref]
                self._check_produced(stage, out.name, value, f"message {msg.id!r}", msg.dtype, msg.shape, batch)
                self.transport.send(msg, value)
            elif out.role == "carried":
                carried[out.ref] = value
            else:
                spec = self._outputs[out.ref]
                self._check_produced(stage, out.name, value, f"model output {spec.name!r}", spec.dtype,
                                     spec.shape, batch)
                model_outputs[out.ref] = value

    def _check_produced(self, stage: Stage, name: str, value: np.ndarray, what: str, dtype: str, shape: list,
                        batch: int | None) -> None:
        """BundleError if a stage produced something other than what the schedule declares."""
        if (dtype_name(value.dtype) != dtype or value.ndim != len(shape) or value.shape[1:] != tuple(shape[1:])
                or (batch is not None and value.shape[0] != batch)):
            expected = _fmt([batch if batch is not None else BATCH] + list(shape[1:]))
            raise BundleError(f"{self._where(stage)}: graph output {name!r} for {what} is {dtype_name(value.dtype)} "
                              f"{_fmt(value.shape)}, but {dtype} {expected} is expected; the stage graph and "
                              f"schedule.json disagree: re-export")


def _drop_after(stages: list[Stage]) -> list[list[str]]:
    """The carried values to drop after each stage: after their last use, or at once if never used."""
    last_use = {o.ref: stage.index for stage in stages for o in stage.outputs if o.role == "carried"}
    last_use |= {i.ref: stage.index for stage in stages for i in stage.inputs if i.source == "carried"}
    return [[ref for ref, last in last_use.items() if last == stage.index] for stage in stages]


def run_local(out_dir: str | os.PathLike, inputs, *, timeout: float = DEFAULT_TIMEOUT,
              threads: int = 1) -> list[np.ndarray]:
    """Run the export in `out_dir` with every node in a thread of this process; the model outputs, in
    `schedule.outputs` order.

    `inputs`: one numpy array or torch.Tensor, or a sequence of them in the model's input order (dtype and
    every dimension but the batch as exported). `timeout`: seconds a node waits for one message. `threads`:
    onnxruntime threads per node. If a node fails, the others stop and NodeFailure names the node and cause.
    """
    return run_bundle(load_bundle(out_dir), inputs, timeout=timeout, threads=threads)


def run_bundle(bundle: Bundle, inputs, *, timeout: float = DEFAULT_TIMEOUT, threads: int = 1) -> list[np.ndarray]:
    """`run_local` on an already loaded bundle."""
    bundle.require(*range(bundle.schedule.nodes))
    model_inputs = check_inputs(bundle.schedule, inputs)
    return local_runner(bundle, timeout=timeout, threads=threads)(model_inputs)


def local_runner(bundle: Bundle, *, timeout: float = DEFAULT_TIMEOUT,
                 threads: int = 1) -> Callable[[object], list[np.ndarray]]:
    """`run_bundle` with its sessions made once: a function of the inputs, to call for many requests."""
    hub = InProcHub(bundle.schedule.nodes)
    executors = [NodeExecutor(bundle, k, hub.transport(k, bundle.schedule_hash), threads=threads, timeout=timeout)
                 for k in range(bundle.schedule.nodes)]
    return lambda inputs: run_executors(executors, hub, check_inputs(bundle.schedule, inputs))


def run_executors(executors: list[NodeExecutor], hub: InProcHub, model_inputs: dict[str, np.ndarray]
                  ) -> list[np.ndarray]:
    """Run one NodeExecutor per node (node k: executors[k], all on `hub`'s transports), each in a thread of this
    process; the model outputs, in `schedule.outputs` order (`run_bundle`)."""
    schedule, timeout = executors[0].bundle.schedule, executors[0].timeout
    results: dict[int, dict[str, np.ndarray] | None] = {}
    failures: list[tuple[int, BaseException]] = []  # in the order they happened
    lock = threading.Lock()

    def work(k: int) -> None:
        try:
            results[k] = executors[k].run(model_inputs if k == 0 or schedule.inputs_on_all_nodes else None)
        except BaseException as exc:  # reported below, in the caller's thread
            with lock:
                failures.append((k, exc))

    threads_ = [threading.Thread(target=work, args=(k,), name=f"disco-node{k}", daemon=True)
                for k in range(schedule.nodes)]
    for t in threads_:
        t.start()
    try:
        _wait(threads_, failures, timeout)
    except BaseException:
        hub.abort(None, "the caller was interrupted")
        raise
    if failures:
        # the cause: a node's own failure before a timeout waiting for a node that failed, before a peer's report
        node, cause = next(((k, e) for k, e in failures if not isinstance(e, (PeerFailed, PeerTimeout))),
                           next(((k, e) for k, e in failures if not isinstance(e, PeerFailed)), failures[0]))
        stuck = [k for k, t in enumerate(threads_) if t.is_alive()]
        note = (f"; node(s) {stuck} did not stop within {timeout + _STOP_GRACE:g} s" if stuck
                else "; the other nodes were stopped")
        raise NodeFailure(f"node {node} failed: {cause}{note}", node) from cause
    outputs = results[0]
    return [outputs[t.name] for t in schedule.outputs]


def _wait(threads: list[threading.Thread], failures: list, timeout: float) -> None:
    """Until every thread has ended, or until `timeout` + _STOP_GRACE seconds after the first of `failures`."""
    give_up = None
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.02)
        if failures and give_up is None:
            give_up = time.monotonic() + timeout + _STOP_GRACE
        if give_up is not None and time.monotonic() > give_up:
            return
