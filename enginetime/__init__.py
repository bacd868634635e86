"""enginetime: per-request engine time for LLM inference engines.

The import root. Subpackages: ``engine_hooks`` (inside the engine, stdlib only),
``sidecar`` (attribution and the gRPC service), ``clients`` (typed clients, the
guard, the CLI's calls), ``testbed`` (a small real engine), ``v1`` (generated stubs).
"""

__version__ = "0.1.0"
