"""``enginetime testbed ...`` and ``enginetime demo``: registered into the ``enginetime`` command.

torch is imported only when a command runs; at registration we only check it is
installed, so ``enginetime --help`` stays fast and names a missing extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

for _module in ("torch", "numpy"):
    if importlib.util.find_spec(_module) is None:
        raise ImportError(
            f"enginetime testbed needs {_module}: pip install 'enginetime[testbed]'", name=_module
        )


def _int_at_least(minimum: int):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"{value!r} must be ≥ {minimum}")
        return n

    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


def add_engine_args(parser: argparse.ArgumentParser, *, shards: int = 4) -> None:
    """Engine and model flags shared by ``testbed serve`` and ``demo``."""
    eng = parser.add_argument_group("engine")
    eng.add_argument("--shards", type=_positive, default=shards, help=f"DP shards (default {shards})")
    eng.add_argument(
        "--coupling",
        choices=("lockstep", "independent"),
        default="lockstep",
        help="lockstep: a barrier ends every step (DP attention + MoE); independent: none (default lockstep)",
    )
    eng.add_argument(
        "--policy",
        choices=("prefill-first", "mixed"),
        default="prefill-first",
        help="prefill-first: prefill chunks run alone, decodes wait (SGLang default); mixed: "
        "one chunk plus every decode per step (default prefill-first)",
    )
    eng.add_argument(
        "--chunk", type=_positive, default=512, help="chunked prefill size in tokens (default 512)"
    )
    eng.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    eng.add_argument("--seed", type=_non_negative, default=0, help="model weights seed (default 0)")
    eng.add_argument(
        "--max-running-requests",
        type=_positive,
        default=1024,
        help="requests a shard runs at once; later ones queue (default 1024)",
    )
    eng.add_argument(
        "--prefix-cache-tokens",
        type=_non_negative,
        default=1 << 18,
        help="prefix cache size per shard in tokens (default 262144)",
    )
    eng.add_argument(
        "--intra-op-threads",
        type=_non_negative,
        default=0,
        help="torch threads per op; 0: cores // shards, at least 1 (default 0)",
    )
    mod = parser.add_argument_group(
        "model (random weights: the figures measure compute, not text; bigger is slower per token)"
    )
    mod.add_argument(
        "--vocab", type=_positive, default=2048, help="vocabulary size: token ids 0..N-1 (default 2048)"
    )
    mod.add_argument("--d-model", type=_positive, default=256, help="hidden size (default 256)")
    mod.add_argument("--layers", type=_positive, default=2, help="transformer layers (default 2)")
    mod.add_argument("--heads", type=_positive, default=4, help="attention heads (default 4)")
    mod.add_argument("--head-dim", type=_positive, default=32, help="size of one head (default 32)")
    mod.add_argument("--d-ff", type=_positive, default=1024, help="MLP hidden size (default 1024)")
    mod.add_argument(
        "--max-context",
        type=_positive,
        default=65536,
        help="longest prompt + output in tokens; longer requests get 400 (default 65536)",
    )


def engine_config(args: argparse.Namespace, *, hooks: bool, ingest: str | None, engine_id: str):
    from .engine import EngineConfig
    from .model import ModelConfig

    model = ModelConfig.from_args(args)
    return EngineConfig(
        num_shards=args.shards,
        coupling=args.coupling,
        policy=args.policy,
        chunk_size=args.chunk,
        max_running_requests=args.max_running_requests,
        prefix_cache_tokens=args.prefix_cache_tokens,
        device=args.device,
        model=model,
        hooks=hooks,
        ingest=ingest,
        engine_id=engine_id,
        intra_op_threads=args.intra_op_threads,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    tb = subparsers.add_parser(
        "testbed",
        help="a small real inference engine instrumented with engine_hooks",
        description="A small real engine (random-weight transformer in torch, continuous batching, chunked "
        "prefill, prefix cache, N DP shards) serving SGLang's /generate subset.",
    )
    tb_sub = tb.add_subparsers(dest="testbed_command", metavar="COMMAND", required=True)

    serve = tb_sub.add_parser(
        "serve",
        help="serve /generate, /abort_request, /health",
        description="Serve the testbed over HTTP (SGLang's API subset; docs/CLIENTS.md has the bodies). "
        'POST /generate {"rid", "input_ids": [token ids], "sampling_params": {"max_new_tokens"}, '
        '"routed_dp_rank": shard, "session_id"}: routed_dp_rank pins the shard (without it the least '
        'loaded shard runs it; session_id alone does not pin). POST /abort_request {"rid"}; GET /health. '
        "Prints 'enginetime testbed ready http=HOST:PORT ...' on stdout once listening; SIGTERM or Ctrl-C "
        "stops it.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument(
        "--port", type=_non_negative, default=30000, help="0 picks a free port (default 30000)"
    )
    serve.add_argument(
        "--ingest",
        default=None,
        help="sidecar ingest address (unix:PATH or tcp:HOST:PORT); default $ENGINETIME_INGEST "
        "or unix:/tmp/enginetime-<uid>/ingest.sock",
    )
    serve.add_argument("--no-hooks", action="store_true", help="run without engine_hooks (overhead baseline)")
    serve.add_argument(
        "--engine-id",
        default="testbed",
        help="the engine's name in the sidecar's accounting (engine_id; default testbed)",
    )
    add_engine_args(serve)
    serve.set_defaults(func=_serve)

    drive = tb_sub.add_parser(
        "sessions",
        help="drive TITO multi-turn sessions against a /generate server",
        description="Run multi-turn token-in/token-out sessions (every turn sends the whole history) and "
        "print each turn's shard, prompt and cached tokens.",
    )
    drive.add_argument(
        "--url", default="http://127.0.0.1:30000", help="the server (default http://127.0.0.1:30000)"
    )
    drive.add_argument("--sessions", type=_positive, default=4, help="sessions run side by side (default 4)")
    drive.add_argument("--turns", type=_positive, default=3, help="turns per session (default 3)")
    drive.add_argument(
        "--routing",
        choices=("round-robin", "sticky"),
        default="round-robin",
        help="round-robin: each turn to the next shard (a migration each turn); sticky: a session's "
        "turns stay on its first shard (default round-robin)",
    )
    drive.add_argument(
        "--prompt-tokens", type=_positive, default=1024, help="first turn's prompt (default 1024)"
    )
    drive.add_argument(
        "--turn-tokens", type=_positive, default=64, help="tokens each later turn adds (default 64)"
    )
    drive.add_argument(
        "--max-new-tokens", type=_non_negative, default=16, help="tokens per turn (default 16)"
    )
    drive.add_argument(
        "--seed", type=_non_negative, default=0, help="seed of the prompts' token ids (default 0)"
    )
    drive.set_defaults(func=_sessions)

    demo = subparsers.add_parser(
        "demo",
        help="reproduce the cross-shard prefill incident and show its accounting",
        description="Start a sidecar and a LOCKSTEP testbed, let victim requests decode on shards "
        "0..N-2, migrate one long session's turn onto the last shard (a prefill storm), and "
        "print per-shard decode tok/s before/during/after, each victim's wall, queue, engine "
        "time, interference and top blame, the storm's own accounting, and the same victims "
        "without the storm.",
    )
    add_engine_args(demo)
    demo.add_argument(
        "--storm-tokens",
        type=_positive,
        default=16384,
        help="context the migrated turn prefills (default 16384: 32 chunks of 512)",
    )
    demo.add_argument(
        "--victims", type=_positive, default=6, help="decoding victims on shards 0..N-2 (default 6)"
    )
    demo.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object instead of the report: config, shards [{shard, role, decode_tok_s "
        "{before, during, after}}], storm {request_id, shard, prompt/prefill/cached tokens, chunks, "
        "prefill_s, wall_s, engine_time_s, gpu_time_s, engine_slowdown (the engine's speed against its "
        "calibrated model), ...}, victims and neighbour [{request_id, shard, "
        "wall_s, queue_s, engine_time_s, gpu_time_s, interference_s, other_s, blame [...]}], baseline "
        "(the same without the storm), timeouts, policies (the two session servers), summary, timeline "
        "(decode tok/s per shard over time), advised (with --routing advised: turn, advice, victims, "
        "victims_mean_wall_s, round_robin, no_storm_victims_mean_wall_s), elapsed_s. Seconds are floats",
    )
    demo.add_argument(
        "--plot",
        metavar="FILE.png",
        default=None,
        help="also draw the incident with matplotlib: per-shard decode tok/s over time with the storm "
        "shaded, and each victim's wall split into queue / engine_time / interference / other beside "
        "its no-storm run",
    )
    demo.add_argument("--otlp-endpoint", default=None, help="passed to the sidecar (--otlp-endpoint)")
    demo.add_argument("--no-baseline", action="store_true", help="skip the run without the storm")
    demo.add_argument(
        "--routing",
        choices=("round-robin", "advised"),
        default="round-robin",
        help="round-robin: the session's turn migrates and storms (default); advised: also run the turn "
        "routed by the sidecar's Advise and show both side by side",
    )
    demo.set_defaults(func=_demo)


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .engine import Engine
    from .http_api import EngineHTTPServer

    try:
        config = engine_config(args, hooks=not args.no_hooks, ingest=args.ingest, engine_id=args.engine_id)
        engine = Engine(config).start()
    except (ValueError, RuntimeError) as exc:
        print(f"enginetime testbed: {exc}", file=sys.stderr)
        return 2
    try:
        server = EngineHTTPServer(engine, args.host, args.port)
    except OSError as exc:
        engine.close()
        print(f"enginetime testbed: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.serve_in_thread()
    host, port = server.server_address[:2]
    assert isinstance(host, str)  # a TCP server's address: (host, port)
    first = engine.shards[0].hooks
    hooks = "off" if first is None else first.recorder.address
    print(
        f"enginetime testbed ready http={host}:{port} shards={args.shards} coupling={args.coupling} "
        f"policy={args.policy} chunk={args.chunk} device={engine.device} hooks={hooks}",
        flush=True,
    )
    try:
        # Wait in short slices: a signal the kernel hands to another thread (it does when the
        # main thread is not runnable, e.g. SIGTERM right after SIGCONT) only sets a flag that
        # the main thread checks between bytecodes; an untimed wait would never see it.
        while not stop.wait(0.2):
            pass
    finally:
        server.stop()
        engine.close()
    return 0


def _sessions(args: argparse.Namespace) -> int:
    from .sessions import SessionDriver

    try:
        with SessionDriver(args.url, routing=args.routing, seed=args.seed) as driver:
            sessions = driver.run(
                args.sessions,
                args.turns,
                prompt_tokens=args.prompt_tokens,
                turn_tokens=args.turn_tokens,
                max_new_tokens=args.max_new_tokens,
            )
    except Exception as exc:
        print(f"enginetime testbed sessions: {exc}", file=sys.stderr)
        return 1
    print(
        f"{'session':<12} {'turn':>4} {'shard':>5} {'prompt':>7} {'cached':>7} {'prefilled':>9} {'wall s':>7}"
    )
    for s in sessions:
        for t in s.turns:
            print(
                f"{s.session_id:<12} {t.turn:>4} {t.shard:>5} {t.prompt_tokens:>7} {t.cached_tokens:>7} "
                f"{t.prefilled_tokens:>9} {t.wall_s:>7.2f}"
            )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import main

    return main(args)
