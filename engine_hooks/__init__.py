"""Engine-side hooks: record steps and request events inside an engine process.

Runs inside SGLang / vLLM / testbed processes, so it is stdlib only (torch is
imported lazily, and only for CUDA event timing). The entry point is ``Recorder``.
"""

from .constants import Coupling, EventKind, StepKind, TimerSource
from .recorder import Recorder, RecorderStats

__all__ = ["Coupling", "EventKind", "Recorder", "RecorderStats", "StepKind", "TimerSource"]
