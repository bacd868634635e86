"""The SGLang adapter against SGLang's real code: 0.5.23 (plugin) and 0.5.4 (launcher).

* 0.5.23, in the engine venv tests/engine_envs.py builds and caches: SGLang's own
  ``load_plugins()`` finds our entry point and its ``HookRegistry`` applies our hooks
  to the real classes; our hooks then run with real ``Scheduler`` / ``Req`` /
  ``ScheduleBatch`` / ``GenerationBatchResult`` objects and SGLang's real DP topology
  (``ParallelContext``), and the frames they send to a socket this test listens on
  are decoded with the sidecar's decoder and checked against the scenario
  (tests/engine_scripts/sglang_hooks_run.py). A whole Scheduler needs a model worker,
  so the forward itself is a stand-in.
* Every attribute the adapter reads (``hooks.READS``) is checked against the class
  definitions in each release's installed source (AST: methods, dataclass fields and
  ``self.x = ...`` assignments, including tuple unpacking, through the base classes).
* 0.5.4 has no plugin system: the launcher's spawn-target redirects and the methods
  ``install_direct`` patches must exist in its wheel, and ``install_direct`` is run
  against 0.5.23's real classes (same code path the launcher runs in each child).

If an engine cannot be installed the tests fail with the build log, never skip.
"""

from __future__ import annotations

import ast
import re
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import engine_envs
import pytest
from engine_envs import SGLANG_OLD_VERSION, SGLANG_VERSION

from enginetime.engine_hooks import StepKind
from enginetime.engine_hooks.constants import Coupling, EventKind
from enginetime.engine_hooks.sglang import hooks as sg_hooks
from enginetime.engine_hooks.sglang import launch_server
from enginetime.sidecar.ingest.records import Event, Hello, Step

NEW = f"sglang-{SGLANG_VERSION}"
OLD = f"sglang-{SGLANG_OLD_VERSION}"
SCRIPTS = Path(__file__).parent / "engine_scripts"


def _ensure(key: str, version: str) -> engine_envs.EngineEnv:
    try:
        return engine_envs.ensure(key)
    except engine_envs.EngineEnvError as exc:
        pytest.fail(f"cannot build the SGLang {version} environment for the adapter tests: {exc}")


@pytest.fixture(scope="module")
def sglang_env() -> engine_envs.EngineEnv:
    return _ensure("sglang", SGLANG_VERSION)


@pytest.fixture(scope="module")
def sglang_old_src() -> engine_envs.EngineEnv:
    return _ensure("sglang-0.5.4", SGLANG_OLD_VERSION)


@pytest.fixture(scope="module")
def shim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    eps = engine_envs.declared_entry_points("sglang.srt.plugins")
    assert eps.get("enginetime") == "enginetime.engine_hooks.sglang:register", (
        'pyproject.toml must declare [project.entry-points."sglang.srt.plugins"] '
        f'enginetime = "enginetime.engine_hooks.sglang:register" (found {eps})'
    )
    return engine_envs.shim(tmp_path_factory.mktemp("shim"))


# ---------------------------------------------------------------------------- real objects, 0.5.23


@pytest.mark.e2e
@pytest.mark.parametrize("engine", [NEW])
def test_plugin_loads_through_sglang_and_records_real_batches(engine: str, sglang_env, shim_dir) -> None:
    sockdir = tempfile.mkdtemp(dir="/tmp", prefix="et-sg-")
    sink = engine_envs.IngestSink(sockdir)
    try:
        result = engine_envs.run_engine_script(
            sglang_env,
            SCRIPTS / "sglang_hooks_run.py",
            [],
            shim_dir=shim_dir,
            extra_env={"ENGINETIME_INGEST": sink.address, "ENGINETIME_ENGINE_ID": "sg-test"},
        )
    finally:
        sink.close()
    tag = f"[{engine}]"
    assert result["sglang_version"] == SGLANG_VERSION, tag
    every = sorted(t for t, _ in sg_hooks.HOOKS)
    assert all(result["targets_exist"].values()) and sorted(result["targets_exist"]) == every, tag
    assert result["applied"] == every and result["wrapped"] == every, f"{tag}: HookRegistry applied our hooks"
    assert result["layout"] == [1, 2, "lockstep", True], f"{tag}: DP-attention rank 1 of 2 (ParallelContext)"
    assert result["errors"] == 0 and result["dropped"] == 0 and result["flushed"], (tag, result)
    assert result["pinned_elsewhere"] == 1 and result["guard_errors"] == 1, tag
    assert result["repeats"] == 2, f"{tag}: steps 3 and 4 (same requests as the step before) sent as repeats"
    assert result["decode_reads"] == 1, f"{tag}: a's decode after b's retraction, read in C"

    (frames,) = sink.frames()
    hello = frames[0]
    assert isinstance(hello, Hello)
    assert (hello.engine_kind, hello.engine_version) == ("sglang", SGLANG_VERSION)
    assert (hello.engine_id, hello.shard, hello.num_shards) == ("sg-test", 1, 2)
    assert hello.coupling == Coupling.LOCKSTEP
    events = [f for f in frames if isinstance(f, Event)]
    steps = [f for f in frames if isinstance(f, Step)]
    ids = {e.handle: e.request_id for e in events if e.kind == EventKind.ARRIVED}
    arrived = {e.request_id: e for e in events if e.kind == EventKind.ARRIVED}
    assert {k: v.prompt_tokens for k, v in arrived.items()} == result["prompts"], tag
    assert arrived["a"].session_id == "sess-a"
    assert [arrived[r].routed_shard for r in "abc"] == [None, 0, 1], f"{tag}: the DP rank each asked for"

    expected = result["expected_steps"]
    assert [s.seq for s in steps] == list(range(len(expected))), tag
    for i, (want, got) in enumerate(zip(expected, steps, strict=True)):
        entries = {
            ids[int(h)]: [int(p), int(d), int(c)]
            for h, p, d, c in zip(
                got.handles, got.prefill_tokens, got.decode_tokens, got.context_tokens, strict=True
            )
        }
        assert StepKind(got.kind).name == want["kind"], (tag, i, want, got)
        assert entries == want["entries"], (tag, i, entries, want)
        assert [int(x) for x in got.peer_tokens] == want["peer"], (tag, i)
        assert got.global_step == want["global_step"], (tag, i, "global_step = forward_ct")
        assert got.device_time_ns >= 1_000_000, (tag, i, "the stand-in forward takes >= 2 ms")
    # Delayed sampling under overlap: the clock of step 3 ran until its sample launched.
    assert steps[2].device_time_ns >= 20_000_000, (tag, steps[2].device_time_ns)
    assert all(s.device_time_ns < 20_000_000 for j, s in enumerate(steps) if j != 2), tag

    by_kind: dict[int, list[Event]] = defaultdict(list)
    for e in events:
        by_kind[e.kind].append(e)
    sched = {ids[e.handle]: e.cached_tokens for e in by_kind[EventKind.SCHEDULED]}
    assert sched == {"a": 0, "b": 16}, f"{tag}: SCHEDULED with the prefix-cache hit"
    assert [ids[e.handle] for e in by_kind[EventKind.PREEMPTED]] == ["b"], tag
    assert [ids[e.handle] for e in by_kind[EventKind.RESUMED]] == ["b"], tag
    (fin,) = by_kind[EventKind.FINISHED]
    assert ids[fin.handle] == "a" and fin.finish_reason == "length"
    assert fin.output_tokens == result["expected_finished"]["a"]["output_tokens"]
    assert [ids[e.handle] for e in by_kind[EventKind.ABORTED]] == result["expected_aborted"], tag
    position = {id(f): i for i, f in enumerate(frames)}
    preempted_at = position[id(by_kind[EventKind.PREEMPTED][0])]
    assert preempted_at < position[id(steps[5])], "preempted, then re-prefilled"


@pytest.mark.e2e
@pytest.mark.parametrize("engine", [NEW])
def test_launcher_install_direct_patches_real_classes(engine: str, sglang_env, shim_dir) -> None:
    """What the launcher runs in each spawned scheduler process, on 0.5.23's classes."""
    code = "\n".join(
        [
            f"import sys, json, pkgutil; sys.path.insert(0, {str(SCRIPTS)!r})",
            "import torchvision_standin; torchvision_standin.install()",
            "from enginetime.engine_hooks.sglang import hooks, launch_server",
            "first = hooks.install_direct(); second = hooks.install_direct()",
            "marked = sorted(t for t, h in hooks.HOOKS",
            "                if getattr(pkgutil.resolve_name(t), '__enginetime_hook__', None) is h)",
            "print(json.dumps({'first': first, 'second': second, 'marked': marked,",
            "                  'plugins': launch_server.has_plugin_system()}))",
        ]
    )
    script = Path(tempfile.mkdtemp(prefix="et-sgl-")) / "direct.py"
    script.write_text(code)
    result = engine_envs.run_engine_script(sglang_env, script, [], shim_dir=shim_dir)
    every = sorted(t for t, _ in sg_hooks.HOOKS)
    assert sorted(result["first"]) == every and result["second"] == [], engine
    assert result["marked"] == every and result["plugins"] is True, engine


# ---------------------------------------------------------------------------- source checks


#: classes whose fields SGLang assembles from namespace classes in these modules
FIELD_NAMESPACES = {"ServerArgs": "sglang.srt.arg_groups.fields"}


class SourceIndex:
    """Classes of one SGLang release, read with ast (nothing imported).

    A regex pass maps class names to files; only files defining a class we look at
    (and its bases) are parsed.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._files: dict[str, list[Path]] = defaultdict(list)
        self._trees: dict[Path, ast.Module] = {}
        self.modules: dict[str, Path] = {}
        pattern = re.compile(r"^\s*class\s+(\w+)", re.M)
        for path in (root / "sglang" / "srt").rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            self.modules[".".join(rel.parts)] = path
            for name in pattern.findall(path.read_text(errors="replace")):
                self._files[name].append(path)

    def _tree(self, path: Path) -> ast.Module:
        if path not in self._trees:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # their invalid escape sequences, not ours
                self._trees[path] = ast.parse(path.read_text(errors="replace"))
        return self._trees[path]

    def class_defs(self, name: str) -> list[ast.ClassDef]:
        found = []
        for path in dict.fromkeys(self._files.get(name, ())):
            found.extend(
                node
                for node in ast.walk(self._tree(path))
                if isinstance(node, ast.ClassDef) and node.name == name
            )
        return found

    def names(self, cls: str, seen: set[str] | None = None) -> set[str]:
        """Methods, class-level fields and self.X assignments of ``cls`` and its bases."""
        seen = seen or set()
        if cls in seen:
            return set()
        seen.add(cls)
        out: set[str] = set()
        prefix = FIELD_NAMESPACES.get(cls)
        if prefix:  # fields assembled from namespace classes (0.5.23's ServerArgs)
            for module, path in self.modules.items():
                if module.startswith(prefix):
                    for node in ast.walk(self._tree(path)):
                        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                            out.add(node.target.id)
        for node in self.class_defs(cls):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    out.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    out.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    out.update(t.id for t in item.targets if isinstance(t, ast.Name))
            for sub in ast.walk(node):
                targets: list[ast.expr] = []
                if isinstance(sub, ast.Assign):
                    targets = list(sub.targets)
                elif isinstance(sub, ast.AnnAssign | ast.AugAssign):
                    targets = [sub.target]
                stack = targets
                while stack:
                    t = stack.pop()
                    if isinstance(t, ast.Tuple | ast.List):
                        stack.extend(t.elts)
                    elif isinstance(t, ast.Attribute) and getattr(t.value, "id", None) == "self":
                        out.add(t.attr)
            for base in node.bases:
                name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", None)
                if name:
                    out |= self.names(name, seen)
        return out

    def module_names(self, module: str) -> set[str]:
        """Top-level defs, imports and assignments of a module."""
        tree = self._tree(self.modules[module])
        out: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                out.add(node.name)
            elif isinstance(node, ast.ImportFrom | ast.Import):
                out.update(a.asname or a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.Assign):
                out.update(t.id for t in node.targets if isinstance(t, ast.Name))
        return out


_INDEXES: dict[Path, SourceIndex] = {}


def _index(root: Path) -> SourceIndex:
    if root not in _INDEXES:
        _INDEXES[root] = SourceIndex(root)
    return _INDEXES[root]


def _missing_reads(index: SourceIndex, reads: dict[str, tuple[str, ...]]) -> list[str]:
    missing = []
    for cls, attrs in reads.items():
        assert index.class_defs(cls), f"class {cls} not found in {index.root}"
        have = index.names(cls)
        for attr in attrs:
            if not any(alt in have for alt in attr.split("|")):
                missing.append(f"{cls}.{attr}")
    return missing


@pytest.mark.e2e
@pytest.mark.parametrize("engine", [NEW])
def test_every_attribute_read_exists_in_0_5_23(engine: str, sglang_env) -> None:
    index = _index(sglang_env.source_root)
    assert _missing_reads(index, sg_hooks.READS) == [], engine
    context = (sglang_env.source_root / "sglang" / "srt" / "runtime_context.py").read_text()
    missing = [f for f in sg_hooks.PARALLEL_FIELDS if f'"{f}"' not in context]
    assert missing == [], f"{engine}: ParallelContext fields the adapter reads: {missing}"


@pytest.mark.e2e
@pytest.mark.parametrize("engine", [OLD])
def test_every_attribute_read_exists_in_0_5_4(engine: str, sglang_old_src) -> None:
    index = _index(sglang_old_src.source_root)
    reads = dict(sg_hooks.READS)
    reads["Scheduler"] = reads["Scheduler"] + sg_hooks.READS_WITHOUT_RUNTIME_CONTEXT["Scheduler"]
    assert _missing_reads(index, reads) == [], engine
    assert "sglang.srt.runtime_context" not in index.modules, f"{engine} predates get_parallel()"


@pytest.mark.e2e
@pytest.mark.parametrize("engine", [OLD])
def test_launcher_targets_exist_in_0_5_4(engine: str, sglang_old_src) -> None:
    """0.5.4 has no plugins: the launcher redirects its spawn targets and patches classes."""
    root = sglang_old_src.source_root
    index = _index(root)
    assert not (root / "sglang" / "srt" / "plugins").exists(), f"{engine} has no plugin system"
    assert (root / "sglang" / "launch_server.py").exists(), "runpy target of the launcher"
    for module, name, _ in launch_server.REDIRECTS:
        assert name in index.module_names(module), f"{engine}: {module}.{name} (a spawn target)"
    assert "run_scheduler_process" in index.module_names(launch_server.SCHEDULER_MODULE)
    assert "run_data_parallel_controller_process" in index.module_names(launch_server.DPC_MODULE)
    engine_src = (root / "sglang" / "srt" / "entrypoints" / "engine.py").read_text()
    assert "target=run_scheduler_process" in engine_src and "target=run_data_parallel_controller_process" in (
        engine_src
    ), f"{engine} spawns these by their module-global names (what the launcher rebinds)"
    dpc_src = (root / "sglang" / "srt" / "managers" / "data_parallel_controller.py").read_text()
    assert "target=run_scheduler_process" in dpc_src
    for target, _ in sg_hooks.HOOKS:
        _, cls, attr = target.rsplit(".", 2)
        assert attr in index.names(cls), f"{engine}: {target} (patched by install_direct)"


# ------------------------------------------------------------------ never into the engine (main venv)


def test_hooks_never_raise_and_forget_a_step_whose_forward_raised(monkeypatch) -> None:
    """A batch the adapter cannot read is counted and the forward still runs; a forward
    that raises re-raises SGLang's own exception, and the step's requests do not stay
    'in flight' (their finish is still reported)."""
    import types

    sockdir = tempfile.mkdtemp(dir="/tmp", prefix="et-sgf-")
    sink = engine_envs.IngestSink(sockdir)
    monkeypatch.setenv("ENGINETIME_INGEST", sink.address)
    monkeypatch.setenv("ENGINETIME_TIMER", "cpu")

    class Sched:  # SGLang 0.5.4-style attributes (no runtime context in this venv)
        forward_ct = 0
        enable_overlap = False
        waiting_queue: list = []
        server_args = types.SimpleNamespace(tokenizer_worker_num=1, dp_size=1, enable_dp_attention=False)

    class Req:
        def __init__(self, rid: str) -> None:
            self.rid, self.origin_input_ids, self.output_ids = rid, [1] * 8, []
            self.finished_reason = None

        def finished(self) -> bool:
            return self.finished_reason is not None

    sched = Sched()
    r = Req("x")
    mode = types.SimpleNamespace(name="EXTEND")
    bad = types.SimpleNamespace(forward_mode=mode, reqs=[r], extend_lens=[8, 1], prefix_lens=[0])
    ran = []
    assert sg_hooks.around_run_batch(lambda s, b: ran.append(b) or "result", sched, bad) == "result"
    assert ran == [bad]
    ad = sched.__dict__["_enginetime"]
    assert ad.guard.errors.count == 1  # the unreadable batch, counted

    good = types.SimpleNamespace(forward_mode=mode, reqs=[r], extend_lens=[8], prefix_lens=[0])

    def boom(s, b):
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        sg_hooks.around_run_batch(boom, sched, good)
    assert ad.in_flight.counts == {}
    r.finished_reason = types.SimpleNamespace(to_json=lambda: {"type": "abort"})
    sg_hooks.around_process_batch_result(lambda s, b, res: None, sched, good, None)
    assert ad.recorder.flush(5.0)
    ad.recorder.close()
    sink.close()
    frames = [f for conn in sink.frames() for f in conn]
    assert not [f for f in frames if isinstance(f, Step)]  # neither step reached the sidecar
    kinds = [f.kind for f in frames if isinstance(f, Event)]
    assert kinds == [EventKind.ARRIVED, EventKind.SCHEDULED, EventKind.ABORTED]


def test_an_unchanged_decode_batch_is_a_repeat_and_a_finish_waits_for_it(monkeypatch) -> None:
    """Steady decode (the same Req objects step after step) is recorded as repeats: the
    sidecar still gets each step's full columns. A request that finishes while a repeat
    step holding it waits for its sampling launch is reported after that step; a changed
    batch is read in full again; a repeat whose forward raised holds nothing."""
    import types

    sockdir = tempfile.mkdtemp(dir="/tmp", prefix="et-sgr-")
    sink = engine_envs.IngestSink(sockdir)
    monkeypatch.setenv("ENGINETIME_INGEST", sink.address)
    monkeypatch.setenv("ENGINETIME_TIMER", "cpu")

    class Sched:
        forward_ct = 0
        enable_overlap = True
        waiting_queue: list = []
        server_args = types.SimpleNamespace(tokenizer_worker_num=1, dp_size=1, enable_dp_attention=False)

    class Req:
        def __init__(self, rid: str, prompt: int) -> None:
            self.rid, self.origin_input_ids, self.output_ids = rid, [1] * prompt, [9]
            self.finished_reason = None

        def finished(self) -> bool:
            return self.finished_reason is not None

    sched = Sched()
    x, y, z = Req("x", 10), Req("y", 20), Req("z", 5)
    decode = types.SimpleNamespace(name="DECODE")

    def batch(*reqs: Req) -> types.SimpleNamespace:
        return types.SimpleNamespace(forward_mode=decode, reqs=list(reqs))

    def step(b, delay: bool = False):
        def forward(s, _b):
            s.forward_ct += 1
            return types.SimpleNamespace(delay_sample_func=(lambda: None) if delay else None)

        out = sg_hooks.around_run_batch(forward, sched, b)
        for r in b.reqs:
            r.output_ids.append(9)
        return out

    step(batch(x, y))  # read in full: contexts 10 and 20
    step(batch(x, y))  # repeat
    res = step(batch(x, y), delay=True)  # repeat, recorded when its sampling launches
    x.finished_reason = types.SimpleNamespace(to_json=lambda: {"type": "stop"})
    sg_hooks.around_process_batch_result(lambda s, b, r: None, sched, batch(x, y), None)
    ad = sched.__dict__["_enginetime"]
    assert "x" in ad.in_flight.deferred  # the delayed repeat still holds x
    sg_hooks.around_launch_batch_sample_if_needed(lambda s, r: None, sched, res)
    step(batch(y, z))  # changed, z never scheduled before: the general path (SCHEDULED for z)
    step(batch(y, z))  # repeat
    step(batch(z, y))  # changed, both known: read in C

    def boom(s, b):
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RuntimeError):
        sg_hooks.around_run_batch(boom, sched, batch(y, z))
    z.finished_reason = types.SimpleNamespace(to_json=lambda: {"type": "stop"})
    sg_hooks.around_process_batch_result(lambda s, b, r: None, sched, batch(y, z), None)
    assert (
        ad.repeats == 3
        and ad.decode_reads == 2
        and ad.in_flight.deferred == {}
        and ad.in_flight.batches == []
    )
    assert ad.recorder.flush(5.0)
    ad.recorder.close()
    sink.close()
    frames = [f for conn in sink.frames() for f in conn]
    ids = {f.handle: f.request_id for f in frames if isinstance(f, Event) and f.kind == EventKind.ARRIVED}
    steps = [f for f in frames if isinstance(f, Step)]
    got = [
        {
            ids[h]: (p, d, c)
            for h, p, d, c in zip(s.handles, s.prefill_tokens, s.decode_tokens, s.context_tokens, strict=True)
        }
        for s in steps
    ]
    assert got == [
        {"x": (0, 1, 10), "y": (0, 1, 20)},
        {"x": (0, 1, 11), "y": (0, 1, 21)},
        {"x": (0, 1, 12), "y": (0, 1, 22)},
        {"y": (0, 1, 23), "z": (0, 1, 5)},
        {"y": (0, 1, 24), "z": (0, 1, 6)},
        {"z": (0, 1, 7), "y": (0, 1, 25)},
    ]
    position = {id(f): i for i, f in enumerate(frames)}
    finished = [f for f in frames if isinstance(f, Event) and f.kind == EventKind.FINISHED]
    assert [ids[f.handle] for f in finished] == ["x", "z"]
    assert position[id(finished[0])] > position[id(steps[2])]  # after the repeat that held it
