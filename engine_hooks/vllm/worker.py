"""vLLM process-side hooks installed by the ``vllm.general_plugins`` entry point.

vLLM loads general plugins in every process it starts (API server, engine core,
workers), possibly more than once, so ``install()`` is idempotent and patches a
vLLM module only when that process imports it (a post-import hook): the API server
never imports the GPU worker and pays nothing.

* ``vllm.v1.worker.gpu_worker.Worker`` — ``execute_model`` / ``sample_tokens``:
  a CUDA-event clock around the step's forward and sampling (started before the
  forward launches, stopped once sampling has launched; nothing waits for the GPU),
  handed to this process's scheduler recording by the ``SchedulerOutput`` it ran.
  ``execute_dummy_batch`` (a DP rank with no work while its peers run): an IDLE
  step. This works where the worker shares the engine-core process (TP=PP=1,
  ``UniProcExecutor``); with worker processes the scheduler estimates durations
  on the CPU instead (see recording.py). CUDA-graph capture is never timed (the
  timer checks ``torch.cuda.is_current_stream_capturing``).
* ``vllm.v1.request.Request.from_engine_core_request`` — keeps the user's request
  id (``external_req_id``, the ``X-Request-Id``) and the DP rank the request asked
  for (``data_parallel_rank``) on the scheduler's ``Request``.
* ``vllm.v1.engine.core.DPEngineCoreProc._process_engine_step`` — lets the
  recording read the DP core's ``current_wave``/``step_counter`` (equal on all DP
  ranks at the same step): the lockstep ``global_step``.

Every wrapper calls vLLM's method and returns its result unchanged; our own work
is guarded (counted, logged once, never raised).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import logging
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

from ..adapter_common import Guard
from . import recording

log = logging.getLogger("enginetime.engine_hooks")
_guard = Guard()
_MARK = "__enginetime_wrapped__"

WORKER_MODULE = "vllm.v1.worker.gpu_worker"
REQUEST_MODULE = "vllm.v1.request"
CORE_MODULE = "vllm.v1.engine.core"

#: what ``install`` patches: (module, class, attribute)
TARGETS = (
    (WORKER_MODULE, "Worker", "execute_model"),
    (WORKER_MODULE, "Worker", "sample_tokens"),
    (WORKER_MODULE, "Worker", "execute_dummy_batch"),
    (REQUEST_MODULE, "Request", "from_engine_core_request"),
    (CORE_MODULE, "DPEngineCoreProc", "_process_engine_step"),
)

patched: set[str] = set()  # "module.Class.attr" actually patched in this process
_lock = threading.Lock()


# ---------------------------------------------------------------------------- post-import hooks


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs callbacks right after a watched module finishes executing."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callable[[Any], None]]] = {}
        self._busy = threading.local()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.callbacks or getattr(self._busy, "name", None) == fullname:
            return None
        self._busy.name = fullname
        try:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        finally:
            self._busy.name = None
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        callbacks = self.callbacks

        class _Loader(importlib.abc.Loader):
            """The module's own loader, plus our callbacks after it executes."""

            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: Any) -> None:
                loader.exec_module(module)
                for cb in callbacks.get(fullname, ()):
                    _guard.call(f"patching {fullname}", cb, module)

            def __getattr__(self, name: str) -> Any:  # get_source, get_code, ... (inspect, linecache)
                return getattr(loader, name)

        spec.loader = _Loader()
        return spec


_finder: _PostImportFinder | None = None


def when_imported(module_name: str, callback: Callable[[Any], None]) -> None:
    """``callback(module)`` now if the module is loaded, else right after it is."""
    global _finder
    module = sys.modules.get(module_name)
    if module is not None:
        _guard.call(f"patching {module_name}", callback, module)
        return
    with _lock:
        if _finder is None:
            _finder = _PostImportFinder()
            sys.meta_path.insert(0, _finder)
        _finder.callbacks.setdefault(module_name, []).append(callback)


def _wrap(cls: Any, attr: str, make: Callable[[Callable[..., Any]], Callable[..., Any]], key: str) -> None:
    raw = cls.__dict__.get(attr)
    if raw is None:
        original = getattr(cls, attr, None)
        if original is None:
            _guard.report(f"vLLM has no {key}", f"{key} is missing in this vLLM version; that hook is off")
            return
    else:
        original = raw
    if getattr(original, _MARK, False) or getattr(getattr(original, "__func__", None), _MARK, False):
        return
    if isinstance(original, classmethod):
        inner = functools.update_wrapper(make(original.__func__), original.__func__)
        setattr(inner, _MARK, True)
        wrapped: Any = classmethod(inner)
    else:
        wrapped = functools.update_wrapper(make(original), original)
        setattr(wrapped, _MARK, True)
    setattr(cls, attr, wrapped)
    patched.add(key)


# ---------------------------------------------------------------------------- the hooks


def _patch_worker(module: Any) -> None:
    cls = getattr(module, "Worker", None)
    if cls is None:
        _guard.report("vLLM has no gpu_worker.Worker", "worker timing is off; steps are timed on the CPU")
        return
    _wrap(cls, "execute_model", _execute_model, f"{WORKER_MODULE}.Worker.execute_model")
    _wrap(cls, "sample_tokens", _sample_tokens, f"{WORKER_MODULE}.Worker.sample_tokens")
    _wrap(cls, "execute_dummy_batch", _execute_dummy_batch, f"{WORKER_MODULE}.Worker.execute_dummy_batch")


def _timed_recording(scheduler_output: Any = None) -> recording.VllmRecording | None:
    rec = recording.active()
    if rec is None or not rec.worker_timing:
        return None
    if scheduler_output is not None and not getattr(scheduler_output, "total_num_scheduled_tokens", 0):
        return None
    return rec


def _execute_model(original: Callable[..., Any]) -> Callable[..., Any]:
    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        rec = _guard.call("vllm worker hook", _timed_recording, scheduler_output)
        if rec is None:
            return original(self, scheduler_output, *args, **kwargs)
        token = rec.recorder.step_begin()
        try:
            out = original(self, scheduler_output, *args, **kwargs)
        except BaseException:
            rec.recorder.step_abort(token)
            raise
        try:
            if out is None:  # sampling follows in sample_tokens
                self._enginetime_pending = (scheduler_output, token)
            else:
                rec.device_stopped(scheduler_output, rec.recorder.step_stop(token))
        except Exception as exc:
            _guard.report("vllm execute_model hook", exc)
        return out

    return execute_model


def _sample_tokens(original: Callable[..., Any]) -> Callable[..., Any]:
    def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        pending: Any = self.__dict__.pop("_enginetime_pending", None) if hasattr(self, "__dict__") else None
        rec = recording.active() if pending is not None else None
        try:
            out = original(self, *args, **kwargs)
        except BaseException:
            if rec is not None:
                rec.recorder.step_abort(pending[1])
            raise
        if rec is not None:
            try:
                rec.device_stopped(pending[0], rec.recorder.step_stop(pending[1]))
            except Exception as exc:
                _guard.report("vllm sample_tokens hook", exc)
        return out

    return sample_tokens


def _execute_dummy_batch(original: Callable[..., Any]) -> Callable[..., Any]:
    def execute_dummy_batch(self: Any, *args: Any, **kwargs: Any) -> Any:
        rec = _guard.call("vllm worker hook", _timed_recording)
        if rec is None:
            return original(self, *args, **kwargs)
        token = rec.recorder.step_begin()
        try:
            out = original(self, *args, **kwargs)
        except BaseException:
            rec.recorder.step_abort(token)
            raise
        rec.record_idle(rec.recorder.step_stop(token))
        return out

    return execute_dummy_batch


def _patch_request(module: Any) -> None:
    cls = getattr(module, "Request", None)
    if cls is None:
        _guard.report("vLLM has no v1.request.Request", "external request ids are not reported")
        return
    _wrap(
        cls,
        "from_engine_core_request",
        _from_engine_core_request,
        f"{REQUEST_MODULE}.Request.from_engine_core_request",
    )


def _from_engine_core_request(original: Callable[..., Any]) -> Callable[..., Any]:
    def from_engine_core_request(cls: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        req = original(cls, request, *args, **kwargs)
        try:
            external = getattr(request, "external_req_id", None)
            if external:
                req._enginetime_external_id = str(external)
            rank = getattr(request, "data_parallel_rank", None)
            if isinstance(rank, int):
                req._enginetime_dp_rank = rank
        except Exception as exc:
            _guard.report("vllm request hook", exc)
        return req

    return from_engine_core_request


def _patch_core(module: Any) -> None:
    cls = getattr(module, "DPEngineCoreProc", None)
    if cls is None:
        return  # no DP engine core in this version: steps carry no global_step
    _wrap(
        cls,
        "_process_engine_step",
        _process_engine_step,
        f"{CORE_MODULE}.DPEngineCoreProc._process_engine_step",
    )


def _process_engine_step(original: Callable[..., Any]) -> Callable[..., Any]:
    def _process_engine_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        et = getattr(getattr(self, "scheduler", None), "_enginetime", None)
        if et is not None and et.core_ref is None:
            try:
                et.core_ref = weakref.ref(self)
            except Exception as exc:
                _guard.report("vllm DP core hook", exc)
        return original(self, *args, **kwargs)

    return _process_engine_step


_installed = False


def install() -> None:
    """Install the process-side hooks (idempotent; each applies when its module loads)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    when_imported(WORKER_MODULE, _patch_worker)
    when_imported(REQUEST_MODULE, _patch_request)
    when_imported(CORE_MODULE, _patch_core)
