"""enginetime inside vLLM (v1 engine).

Two pieces, both off until asked for:

* the ``vllm.general_plugins`` entry point ``register`` (``enginetime =
  enginetime.engine_hooks.vllm:register``), which vLLM runs in each of its
  processes: worker-side CUDA-event timing, the user's request id and pinned DP
  rank on each request, the DP step counter (see ``worker.py``);
* the scheduler classes for ``--scheduler-cls``, which record every step and
  request event: ``enginetime.engine_hooks.vllm.scheduler.AsyncScheduler`` (vLLM's
  default async scheduling) or ``...scheduler.Scheduler`` (``--no-async-scheduling``).

Importing this package does not import vLLM.
"""

from __future__ import annotations

import logging

from ..adapter_common import AdapterSettings

log = logging.getLogger("enginetime.engine_hooks")

ENTRY_POINT_GROUP = "vllm.general_plugins"
ENTRY_POINT = "enginetime = enginetime.engine_hooks.vllm:register"
SCHEDULER_CLS = "enginetime.engine_hooks.vllm.scheduler.AsyncScheduler"
SYNC_SCHEDULER_CLS = "enginetime.engine_hooks.vllm.scheduler.Scheduler"


def register() -> None:
    """vLLM general plugin: install the process-side hooks. Idempotent; never raises."""
    try:
        if AdapterSettings.from_env("vllm").disabled:
            return
        from .worker import install

        install()
    except Exception as exc:  # a plugin that raises is logged by vLLM, but stay quiet and safe
        log.warning("enginetime: vLLM plugin not installed: %s", exc)


__all__ = ["ENTRY_POINT", "ENTRY_POINT_GROUP", "SCHEDULER_CLS", "SYNC_SCHEDULER_CLS", "register"]
