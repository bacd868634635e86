"""Warm start: the cost models' state saved to a file and loaded when the engine says hello.

A sidecar that starts (or restarts) with cold models attributes the first storm with
a per-token fallback: victims' engine_time was −18 % and the storm over-blamed. With
``--model-state PATH`` the ledger writes every model's observations and fit (and the
lockstep engine's learnt step jitter) to PATH periodically and at shutdown, and loads
them when a shard's hello matches what was saved.

Keyed by what the hello says about the engine: its id, kind, device name, coupling
and shard count (and the shard, for an INDEPENDENT shard's own model). A different
engine, a different GPU or a different layout starts cold rather than with another
engine's costs. JSON, written to a temporary file and renamed (a crash mid-write
leaves the previous state); a file that cannot be read is logged and ignored.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from enginetime.sidecar.ledger.costmodel import CostModel, TieNoise

log = logging.getLogger(__name__)

FORMAT = 1


def model_key(
    engine_id: str, engine_kind: str, device_name: str, coupling: int, num_shards: int, shard: int
) -> str:
    """The state's key for a model (shard -1: the LOCKSTEP engine's one model)."""
    return json.dumps([engine_id, engine_kind, device_name, int(coupling), int(num_shards), int(shard)])


def dump_model(model: CostModel, noise: TieNoise | None = None) -> dict[str, Any]:
    n = model._n
    out: dict[str, Any] = {
        "x": model._x[:n].tolist() if n < model.window else np.roll(model._x, -model._pos, axis=0).tolist(),
        "y": model._y[:n].tolist() if n < model.window else np.roll(model._y, -model._pos).tolist(),
        "beta": None if model.beta is None else model.beta.tolist(),
        "cold_beta": None if model.cold_beta is None else model.cold_beta.tolist(),
    }
    if noise is not None:
        out["noise"] = [noise._w.tolist(), noise._m1.tolist(), noise._m2.tolist()]
    return out


def load_model(model: CostModel, state: dict[str, Any], noise: TieNoise | None = None) -> None:
    """Replace ``model``'s window and fit with the saved ones (validated; ValueError if bad)."""
    x = np.asarray(state["x"], dtype=np.float64)
    y = np.asarray(state["y"], dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != model._x.shape[1] or y.shape != (x.shape[0],):
        raise ValueError(f"saved window has shape {x.shape} / {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("saved window holds non-finite numbers")
    x, y = x[-model.window :], y[-model.window :]
    n = x.shape[0]
    model._x[:] = 0.0
    model._y[:] = 0.0
    model._x[:n] = x
    model._y[:n] = y
    model._n = n
    model._pos = n % model.window
    model._sum_d = float(y.sum())
    model._sum_tok = float((x[:, 1] + x[:, 3]).sum())
    for name in ("beta", "cold_beta"):
        v = state.get(name)
        arr = None if v is None else np.asarray(v, dtype=np.float64)
        if arr is not None and (
            arr.shape != (model._x.shape[1],) or not np.all(np.isfinite(arr)) or (arr < 0).any()
        ):
            raise ValueError(f"saved {name} is not {model._x.shape[1]} finite non-negative numbers")
        setattr(model, name, arr)
    if noise is not None and "noise" in state:
        w, m1, m2 = (np.asarray(v, dtype=np.float64) for v in state["noise"])
        if w.shape == noise._w.shape == m1.shape == m2.shape:
            noise._w[:], noise._m1[:], noise._m2[:] = w, m1, m2
            noise._fresh = False


class ModelStateFile:
    """The ``--model-state`` file: read once at start, written whole on ``save``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.saved: dict[str, dict[str, Any]] = {}
        self.loaded = 0
        if self.path.exists():
            try:
                doc = json.loads(self.path.read_text())
                if doc.get("format") != FORMAT:
                    raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT}")
                self.saved = dict(doc["models"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning(
                    "cannot read the cost-model state %s (%s): starting with cold models; the file is "
                    "rewritten at the next save",
                    self.path,
                    exc,
                )

    def restore(self, key: str, model: CostModel, noise: TieNoise | None = None) -> bool:
        state = self.saved.get(key)
        if state is None:
            return False
        try:
            load_model(model, state, noise)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the saved cost model %s in %s: %s", key, self.path, exc)
            return False
        self.loaded += 1
        return True

    def save(self, models: dict[str, dict[str, Any]]) -> None:
        """Write ``models`` (merged over what was loaded and not seen again) atomically."""
        self.saved.update(models)
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"format": FORMAT, "models": self.saved}))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot write the cost-model state %s: %s", self.path, exc)
