"""enginetime inside SGLang.

* SGLang >= 0.5.11: the ``sglang.srt.plugins`` entry point ``register``
  (``enginetime = enginetime.engine_hooks.sglang:register``). SGLang runs it first
  thing in every scheduler process (``load_plugins()``); it registers AROUND hooks
  with SGLang's ``HookRegistry``, which SGLang then applies (see ``hooks.py``).
* SGLang < 0.5.11 (no plugin system):
  ``python -m enginetime.engine_hooks.sglang.launch_server <sglang's own arguments>``
  installs the same hooks in the scheduler processes SGLang spawns.

Importing this package does not import SGLang.
"""

from __future__ import annotations

import logging

from ..adapter_common import AdapterSettings

log = logging.getLogger("enginetime.engine_hooks")

ENTRY_POINT_GROUP = "sglang.srt.plugins"
ENTRY_POINT = "enginetime = enginetime.engine_hooks.sglang:register"
_registered = False  # once per process: two registrations before apply_hooks would wrap twice


def register() -> None:
    """SGLang general plugin: register our hooks with SGLang's HookRegistry. Never raises.

    SGLang calls ``HookRegistry.apply_hooks()`` after every plugin ran; registering
    twice in one process is harmless (SGLang skips targets it already patched).
    """
    global _registered
    try:
        if _registered or AdapterSettings.from_env("sglang").disabled:
            return
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        from .hooks import HOOKS

        for target, hook in HOOKS:
            HookRegistry.register(target, hook, HookType.AROUND)
        _registered = True
    except Exception as exc:
        log.warning("enginetime: SGLang plugin not registered: %s", exc)


__all__ = ["ENTRY_POINT", "ENTRY_POINT_GROUP", "register"]
