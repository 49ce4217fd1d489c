"""supervisord's programs over its XML-RPC unix socket: state, pid, uptime; start, stop, restart."""

from __future__ import annotations

import asyncio
import http.client
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import Faults

from tokenmill_appliance.supervisor import SupervisorClient

PROTECTED_PROGRAMS = frozenset({"portal", "edge", "tunnel_manager"})
"""The portal itself, the edge and the tunnel manager: stopping them here would cut the UI off."""
ACTIONS = ("start", "stop", "restart")


class SupervisorError(RuntimeError):
    """supervisord could not be reached or refused the call; the message says which and why."""


class ProtectedProgramError(SupervisorError):
    """The program may not be stopped from the portal."""


class UnknownProgramError(SupervisorError):
    pass


def program_name(info: dict[str, Any]) -> str:
    """The name supervisorctl uses: `group:name`, or just `name` for a program alone in its group."""
    group, name = info["group"], info["name"]
    return name if group == name else f"{group}:{name}"


def describe(info: dict[str, Any], skip_note: Callable[[str], Path] | None = None) -> dict[str, Any]:
    """One program for the Services tab. `skipped`: why its wrapper exited without starting it (its app
    is not configured), told by `skip_note(name)`'s file; None unless it has exited."""
    name = program_name(info)
    is_running = info["statename"] == "RUNNING"
    return {
        "name": name,
        "state": info["statename"],
        "pid": info["pid"] or None,
        "uptime_s": max(0, info["now"] - info["start"]) if is_running and info["start"] else 0,
        "description": info.get("description", ""),
        "exit_status": info.get("exitstatus") if info["statename"] == "EXITED" else None,
        "skipped": skip_reason(info, skip_note),
        "is_protected": info["name"] in PROTECTED_PROGRAMS,
    }


def skip_reason(info: dict[str, Any], skip_note: Callable[[str], Path] | None) -> str | None:
    if skip_note is None or info["statename"] != "EXITED" or info.get("exitstatus") != 0:
        return None
    try:
        return skip_note(info["name"]).read_text().strip() or None
    except OSError:
        return None


class ProgramControl:
    """The portal's view of supervisord's programs, over the appliance's `SupervisorClient`: each call
    opens its own connection in a worker thread, and supervisord's faults become `SupervisorError`s."""

    def __init__(self, socket_path: Path, skip_note: Callable[[str], Path] | None = None) -> None:
        self.socket_path = socket_path
        self.skip_note = skip_note

    def _call(self, method: str, *args: Any) -> Any:
        if not self.socket_path.exists():
            raise SupervisorError(f"supervisord is not running (no socket at {self.socket_path})")
        try:
            with SupervisorClient(self.socket_path) as client:
                return client.call(method, *args)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode == Faults.BAD_NAME:
                raise UnknownProgramError(f"no program {args[0]!r} in supervisord") from None
            raise SupervisorError(f"supervisord refused {method}: {fault.faultString}") from None
        except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError) as exc:
            raise SupervisorError(f"cannot reach supervisord at {self.socket_path}: {exc}") from None

    async def programs(self) -> list[dict[str, Any]]:
        infos = await asyncio.to_thread(self._call, "getAllProcessInfo")
        return [describe(info, self.skip_note) for info in infos]

    def _control(self, name: str, action: str) -> dict[str, Any]:
        if not name.isprintable() or any(c.isspace() for c in name):  # no program has such a name
            raise UnknownProgramError(f"no program {name!r} in supervisord")
        info = self._call("getProcessInfo", name)
        if action in ("stop", "restart") and info["name"] in PROTECTED_PROGRAMS:
            done = {"stop": "stopped", "restart": "restarted"}[action]
            raise ProtectedProgramError(f"{name} runs the portal itself and cannot be {done} from here")
        is_active = info["statename"] in ("RUNNING", "STARTING", "BACKOFF")
        if action in ("stop", "restart") and is_active:
            self._call("stopProcess", name, True)
        if action == "restart" or (action == "start" and not is_active):
            self._call("startProcess", name, True)
        return describe(self._call("getProcessInfo", name), self.skip_note)

    async def control(self, name: str, action: str) -> dict[str, Any]:
        """Start, stop or restart program `name`; waits until supervisord reports the change."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
        return await asyncio.to_thread(self._control, name, action)
