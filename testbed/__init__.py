"""The testbed: a small real inference engine, instrumented with engine_hooks.

Modules (import them directly; this package imports nothing, so ``enginetime
--help`` does not pay for torch):

* ``model`` — decoder-only transformer with random weights and a per-request KV cache
* ``scheduler`` — one shard's queue, prefix cache, prefill-first / mixed batching
* ``engine`` — ``Engine``: N DP shards, INDEPENDENT or LOCKSTEP, the step loop
* ``adapter`` — the engine_hooks adapter (one Recorder per shard)
* ``http_api`` — SGLang-compatible ``/generate``, ``/abort_request``, ``/health``
* ``sessions`` — TITO multi-turn session driver (sticky, round-robin or advised routing)
* ``demo`` — ``enginetime demo``: the cross-shard prefill incident, with its accounting
* ``cli`` — ``enginetime testbed serve|sessions`` and ``enginetime demo``
"""
