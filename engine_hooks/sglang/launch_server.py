"""Launch SGLang with enginetime's hooks in every scheduler process (SGLang < 0.5.11).

    python -m enginetime.engine_hooks.sglang.launch_server --model-path M --dp-size 8 ...

takes exactly ``python -m sglang.launch_server``'s arguments and runs SGLang's own
launcher. Why a launcher: before 0.5.11 SGLang has no plugin system, and it starts
its scheduler processes with the ``spawn`` method, so a patch made in the launching
process never reaches them. Instead this module replaces the *targets* SGLang spawns
— ``run_scheduler_process`` (in ``sglang.srt.entrypoints.engine`` and, for DP, in
the data-parallel controller, itself a spawned process) — with wrappers defined here.
``spawn`` pickles a target by module and name, so the child imports this module,
installs the hooks (``hooks.install_direct``) and then calls SGLang's own function.

On SGLang >= 0.5.11 the ``sglang.srt.plugins`` entry point does this by itself; the
launcher then changes nothing and just runs SGLang (so one command works everywhere).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import runpy
import sys
from typing import Any

log = logging.getLogger("enginetime.engine_hooks")

ENGINE_MODULE = "sglang.srt.entrypoints.engine"
DPC_MODULE = "sglang.srt.managers.data_parallel_controller"
SCHEDULER_MODULE = "sglang.srt.managers.scheduler"

#: module globals the launcher redirects: (module, name) -> replacement in this module
REDIRECTS = (
    (ENGINE_MODULE, "run_scheduler_process", "run_scheduler_process"),
    (ENGINE_MODULE, "run_data_parallel_controller_process", "run_data_parallel_controller_process"),
    (DPC_MODULE, "run_scheduler_process", "run_scheduler_process"),
)


def has_plugin_system() -> bool:
    try:
        return importlib.util.find_spec("sglang.srt.plugins") is not None
    except Exception:
        return False


def run_scheduler_process(*args: Any, **kwargs: Any) -> Any:
    """Spawn target: install the hooks in this (new) process, then run SGLang's scheduler."""
    from .hooks import install_direct

    patched = install_direct()
    log.info("enginetime: hooks installed in scheduler process: %s", ", ".join(patched) or "none")
    original = importlib.import_module(SCHEDULER_MODULE).run_scheduler_process
    return original(*args, **kwargs)


def run_data_parallel_controller_process(*args: Any, **kwargs: Any) -> Any:
    """Spawn target: the DP controller spawns the schedulers; redirect its target first."""
    dpc: Any = importlib.import_module(DPC_MODULE)
    original = dpc.run_data_parallel_controller_process
    dpc.run_scheduler_process = _self().run_scheduler_process
    return original(*args, **kwargs)


def _self() -> Any:
    # Functions handed to spawn must be importable by name: never the __main__ copy.
    return importlib.import_module("enginetime.engine_hooks.sglang.launch_server")


def redirect_spawn_targets() -> list[str]:
    """Point SGLang's spawn targets at this module's wrappers; returns what was redirected."""
    me = _self()
    done = []
    for module_name, name, replacement in REDIRECTS:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            log.warning("enginetime: cannot import %s (%s); its processes run unhooked", module_name, exc)
            continue
        if not hasattr(module, name):
            log.warning(
                "enginetime: %s.%s is missing in this SGLang; its processes run without hooks",
                module_name,
                name,
            )
            continue
        setattr(module, name, getattr(me, replacement))
        done.append(f"{module_name}.{name}")
    return done


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if has_plugin_system():
        log.warning(
            "enginetime: this SGLang loads plugins itself; the enginetime plugin records it "
            "(the launcher is only needed before SGLang 0.5.11)"
        )
    else:
        redirect_spawn_targets()
    sys.argv = ["sglang.launch_server", *argv]
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
