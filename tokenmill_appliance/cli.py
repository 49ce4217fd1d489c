"""`tokenmill-appliance` (also reached as `tokenmill portal` / `tokenmill boot`): the appliance's commands.

Each subcommand lives in its own module, imported only when chosen, so `boot` does not pay for the
portal's imports and the reverse.
"""

import importlib
import sys

COMMANDS = {
    "portal": ("tokenmill_appliance.portal.main", "run the auth + TLS edge, the portal UI and the tunnels"),
    "boot": ("tokenmill_appliance.boot", "the container entrypoint: prepare the machine, exec supervisord"),
    "program": ("tokenmill_appliance.programs", "run one supervisor program wrapper (used by supervisord)"),
}


def usage() -> str:
    lines = ["usage: tokenmill-appliance COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<10}{help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
