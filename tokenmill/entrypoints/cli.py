"""The `tokenmill` command: serve, chat, complete, and the appliance's portal/boot.

Each subcommand imports what it needs only when chosen, so `tokenmill --help` stays fast (no torch).
"""

from __future__ import annotations

import os
import sys

from tokenmill import __version__

COMMANDS = {
    "serve": "serve a model over an OpenAI-compatible API (vLLM's flags)",
    "chat": "chat with a running server",
    "complete": "complete text with a running server",
    "portal": "the appliance's auth + TLS edge and portal UI (tokenmill-appliance portal)",
    "boot": "the appliance's container entrypoint (tokenmill-appliance boot)",
}


def usage() -> str:
    lines = ["usage: tokenmill COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<10}{help_text}" for name, help_text in COMMANDS.items()]
    lines += ["", "tokenmill COMMAND --help describes a command's flags."]
    return "\n".join(lines)


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
        # The engine core process (which inherits this) shares the cores with the API process: OpenMP
        # threads that sleep when idle instead of spinning leave them to it between parallel regions.
        # Measured on 2 cores with the serving benchmark: c=1 TPOT 60-58 vs 63 ms, c=64 145-153 vs
        # 138-142 tok/s. (Offline, with nothing to share with, spinning is ~3% faster: `LLM` keeps it.)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from tokenmill.entrypoints.cli_args import parse_serve_args

        serve_args = parse_serve_args(rest)
        from tokenmill.entrypoints.openai.api_server import run_server

        return run_server(serve_args)
    if name in ("chat", "complete"):
        from tokenmill.entrypoints.chat_client import main as client_main

        return client_main(name, rest)
    if name in ("portal", "boot"):
        from tokenmill_appliance.cli import main as appliance_main

        return appliance_main([name, *rest])
    print(f"tokenmill: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
