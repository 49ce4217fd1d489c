"""The `tokenmill` command: serve, chat, complete, bench, and the appliance's portal/boot.

Each subcommand imports what it needs only when chosen, so `tokenmill --help` stays fast (no torch).
"""

from __future__ import annotations

import importlib
import os
import sys

from tokenmill import __version__

COMMANDS = {
    "serve": "serve a model over an OpenAI-compatible API (vLLM's flags)",
    "chat": "chat with a running server",
    "complete": "complete text with a running server",
    "bench": "benchmarks: serving load on any OpenAI-compatible URL, offline throughput and latency",
    "portal": "the appliance's auth + TLS edge and portal UI (tokenmill-appliance portal)",
    "boot": "the appliance's container entrypoint (tokenmill-appliance boot)",
}


def usage() -> str:
    lines = ["usage: tokenmill COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<10}{help_text}" for name, help_text in COMMANDS.items()]
    lines += ["", "tokenmill COMMAND --help describes a command's flags."]
    return "\n".join(lines)


def omp_wait_policy(quantization: str | None) -> str | None:
    """How the engine core's idle OpenMP threads wait (set before torch loads; the core inherits it).
    The core shares the cores with the API process. Float models: threads that sleep when idle leave the
    cores to it between parallel regions (2 cores, serving benchmark: c=1 TPOT 58-60 vs 63 ms, c=64
    145-153 vs 138-142 tok/s). int8 models run many short parallel regions (one per kernel call), where
    waking sleeping threads costs more than it frees: libgomp's default (spin a while, then sleep) measured
    c=1 TPOT 27 vs 31-36 ms and c=16 148 vs 141 tok/s. None: leave libgomp's default."""
    return None if quantization in ("int8", "gguf") else "PASSIVE"


BENCHMARKS = {
    "serve": "streamed load on any OpenAI-compatible server, at several concurrencies",
    "throughput": "offline throughput of a fixed-seed batch, through tokenmill or transformers",
    "latency": "offline latency of one batch, prefill and decode, over repeated runs",
}


def bench_usage() -> str:
    lines = ["usage: tokenmill bench BENCHMARK [ARGS]", "", "benchmarks:"]
    lines += [f"  {name:<12}{help_text}" for name, help_text in BENCHMARKS.items()]
    lines += ["", "tokenmill bench BENCHMARK --help describes its flags."]
    return "\n".join(lines)


def bench_main(args: list[str]) -> int:
    """`tokenmill bench serve|throughput|latency [ARGS]`, as `vllm bench`."""
    if not args or args[0] in ("-h", "--help"):
        print(bench_usage())
        return 0
    if args[0] not in BENCHMARKS:
        print(f"tokenmill bench: unknown benchmark {args[0]!r}\n\n{bench_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"tokenmill.benchmarks.{args[0]}")
    return int(module.main(args[1:]))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if args[0] in ("-V", "--version"):
        print(f"tokenmill {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name == "serve":
        from tokenmill.entrypoints.cli_args import parse_serve_args

        serve_args = parse_serve_args(rest)
        if (policy := omp_wait_policy(serve_args.engine_args.quantization)) is not None:
            os.environ.setdefault("OMP_WAIT_POLICY", policy)
        from tokenmill.engine.core_client import EngineCoreClient

        # The core process starts loading the model now, while this one imports the server (~1 s).
        core = EngineCoreClient(serve_args.engine_args.create_engine_config())
        try:
            core.spawn()
            from tokenmill.entrypoints.openai.api_server import run_server

            return run_server(serve_args, client_factory=core.adopt)
        except KeyboardInterrupt:  # Ctrl-C: uvicorn re-raises it after its graceful shutdown
            return 0
        finally:
            core.shutdown()  # a no-op after the server's own shutdown; else the spawned core is stopped
    if name in ("chat", "complete"):
        from tokenmill.entrypoints.chat_client import main as client_main

        return client_main(name, rest)
    if name == "bench":
        return bench_main(rest)
    if name in ("portal", "boot"):
        from tokenmill_appliance.cli import main as appliance_main

        return appliance_main([name, *rest])
    print(f"tokenmill: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
