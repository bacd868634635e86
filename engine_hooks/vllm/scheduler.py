"""Scheduler classes for vLLM's ``--scheduler-cls``.

    vllm serve MODEL --scheduler-cls enginetime.engine_hooks.vllm.scheduler.AsyncScheduler
    vllm serve MODEL --no-async-scheduling \\
        --scheduler-cls enginetime.engine_hooks.vllm.scheduler.Scheduler

``AsyncScheduler`` / ``Scheduler`` are subclasses of vLLM's classes of the same
names with ``EngineTimeMixin`` in front. They are created on first attribute
access (module ``__getattr__``), so importing enginetime never imports vLLM, and
vLLM's own ``resolve_obj_by_qualname`` builds them inside the engine-core process.
``scheduler_class(base)`` wraps any other scheduler class the same way.

The mixin only observes: every override calls vLLM's method first and returns its
result unchanged; recording failures are counted and logged once, never raised.
"""

from __future__ import annotations

import threading
from typing import Any

from ..adapter_common import AdapterSettings
from .recording import VllmRecording

_BASES = {
    "AsyncScheduler": ("vllm.v1.core.sched.async_scheduler", "AsyncScheduler"),
    "Scheduler": ("vllm.v1.core.sched.scheduler", "Scheduler"),
}
_CLASSES: dict[str, type] = {}
_LOCK = threading.Lock()


class EngineTimeMixin:
    """Records steps and request events of a vLLM v1 scheduler (see recording.py)."""

    _enginetime: VllmRecording | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._enginetime = None
        try:
            settings = AdapterSettings.from_env("vllm")
            if not settings.disabled:
                self._enginetime = VllmRecording(self, settings=settings)
        except Exception as exc:  # never fail the engine's start
            import logging

            logging.getLogger("enginetime.engine_hooks").exception(
                "enginetime: cannot set up vLLM recording (%s); the scheduler runs unrecorded", exc
            )
            self._enginetime = None

    def add_request(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().add_request(request, *args, **kwargs)  # type: ignore[misc]
        et = self._enginetime
        rid = getattr(request, "request_id", None)
        if et is not None and isinstance(rid, str):
            et.on_add_request(rid)
        return result

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        output = super().schedule(*args, **kwargs)  # type: ignore[misc]
        et = self._enginetime
        if et is not None:
            et.on_schedule(output)
        return output

    def update_from_output(
        self, scheduler_output: Any, model_runner_output: Any, *args: Any, **kwargs: Any
    ) -> Any:
        result = super().update_from_output(  # type: ignore[misc]
            scheduler_output, model_runner_output, *args, **kwargs
        )
        et = self._enginetime
        if et is not None:
            et.on_update(scheduler_output)
        return result

    def finish_requests(self, request_ids: Any, finished_status: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().finish_requests(request_ids, finished_status, *args, **kwargs)  # type: ignore[misc]
        et = self._enginetime
        if et is not None:
            et.on_finish_requests(request_ids)
        return result

    def shutdown(self, *args: Any, **kwargs: Any) -> Any:
        et = self._enginetime
        if et is not None:
            et.close()
        return super().shutdown(*args, **kwargs)  # type: ignore[misc]


def scheduler_class(base: type, name: str | None = None) -> type:
    """``base`` (a vLLM v1 scheduler class) with enginetime recording in front."""
    name = name or base.__name__
    return type(
        name,
        (EngineTimeMixin, base),
        {
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"{base.__qualname__} recorded by enginetime.",
        },
    )


def __getattr__(name: str) -> type:
    if name not in _BASES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _LOCK:
        cls = _CLASSES.get(name)
        if cls is None:
            import importlib

            module, attr = _BASES[name]
            base = getattr(importlib.import_module(module), attr)
            cls = _CLASSES[name] = scheduler_class(base, name)
        return cls
