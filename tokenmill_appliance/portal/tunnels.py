"""Cloudflare tunnels through `cloudflared`: quick tunnels on demand, or one named tunnel.

A quick tunnel is `cloudflared --no-autoupdate --url URL`; its public URL is read from its output within
`url_timeout_s`, else the process is killed and the start fails. A named tunnel (CF_TUNNEL_TOKEN) routes
to whatever origins the Cloudflare dashboard names, so it can bypass the edge: that is said loudly.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import re
import signal
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

QUICK_TUNNEL_URL = re.compile(r"https://[-a-z0-9]+\.trycloudflare\.com")
URL_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
NAMED_TUNNEL_WARNING = (
    "A named Cloudflare tunnel (CF_TUNNEL_TOKEN) is configured. It sends traffic to the origins set in the "
    "Cloudflare dashboard and BYPASSES this portal's authentication unless those origins are the "
    "portal's external (edge) ports, the ones the Apps tab links to, never the internal ones."
)


class TunnelError(RuntimeError):
    """A tunnel could not be started or found; the message says why."""


class TunnelNotFoundError(TunnelError):
    """No tunnel has that id."""


class QuickTunnelsOffError(TunnelError):
    """CF_TUNNEL_TOKEN is set: the named tunnel takes the place of quick tunnels."""


@dataclass
class Tunnel:
    id: str
    target: str
    kind: str
    process: asyncio.subprocess.Process
    started_at: float = field(default_factory=time.time)
    public_url: str | None = None
    state: str = "starting"
    output: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=50))
    url_found: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "target": self.target,
            "public_url": self.public_url,
            "state": self.state,
            "pid": self.process.pid,
            "started_at": self.started_at,
        }


def check_target(target: str, edge_ports: Collection[int]) -> str:
    """Tunnels may only point at this machine's edge ports: any other port would publish a service
    without the portal's login in front of it."""
    try:
        parts = urlsplit(target)
        port = parts.port  # ValueError when it is not a number in 0-65535
    except ValueError:
        port = None
    if port is None or parts.scheme not in ("http", "https") or parts.hostname not in LOCAL_HOSTS:
        raise TunnelError(f"tunnel target {target!r} must be http(s)://localhost:PORT")
    if port not in edge_ports:
        ports = ", ".join(str(edge_port) for edge_port in sorted(edge_ports))
        raise TunnelError(
            f"tunnel target port {port} is not one of the edge's ports ({ports}): a tunnel to it would "
            "skip the portal's login; point it at the edge port of that service"
        )
    return target


PORTAL_SECRETS = ("OPEN_BUTTON_TOKEN", "WEB_PASSWORD", "CF_TUNNEL_TOKEN", "VLLM_API_KEY", "TOKENMILL_API_KEY")


def without_portal_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without the portal's and the engine's secrets: cloudflared, a program that talks to the
    internet, needs none of them (the named tunnel gets its own token as TUNNEL_TOKEN)."""
    return {name: value for name, value in env.items() if name not in PORTAL_SECRETS}


class TunnelManager:
    """Starts, lists, refreshes and stops cloudflared processes."""

    def __init__(
        self,
        binary: str | None,
        edge_ports: Collection[int],
        named_token: str = "",
        url_timeout_s: float = URL_TIMEOUT_S,
    ) -> None:
        self.binary = binary
        self.edge_ports = frozenset(edge_ports)
        self.named_token = named_token
        self.url_timeout_s = url_timeout_s
        self._tunnels: dict[str, Tunnel] = {}
        self._ids = itertools.count(1)

    @property
    def is_available(self) -> bool:
        return self.binary is not None

    def status(self) -> dict[str, Any]:
        return {
            "available": self.is_available,
            "message": "" if self.is_available else "cloudflared is not installed on this machine",
            "named": bool(self.named_token),
            # Shown while the token is set, before a start too: the warning is about what starting does.
            "named_warning": NAMED_TUNNEL_WARNING if self.named_token else "",
            "tunnels": [t.describe() for t in self._tunnels.values()],
        }

    async def _spawn(self, args: list[str], env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
        if self.binary is None:
            raise TunnelError("cloudflared is not installed on this machine")
        return await asyncio.create_subprocess_exec(
            self.binary,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            env={**without_portal_secrets(os.environ), **(env or {})},
        )

    async def _read_output(self, tunnel: Tunnel) -> None:
        assert tunnel.process.stdout is not None
        async for raw in tunnel.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            tunnel.output.append(line)
            match = QUICK_TUNNEL_URL.search(line)
            if match and tunnel.public_url is None:
                tunnel.public_url = match.group(0)
                tunnel.state = "running"
                tunnel.url_found.set()
        await tunnel.process.wait()
        if tunnel.state in ("starting", "running"):
            tunnel.state = "exited"
        tunnel.url_found.set()

    async def start(self, target: str, tunnel_id: str | None = None) -> dict[str, Any]:
        """Start a quick tunnel to `target`; returns once its public URL is known."""
        if self.named_token:
            raise QuickTunnelsOffError(
                "a named tunnel is configured (CF_TUNNEL_TOKEN): it replaces quick tunnels; unset "
                "CF_TUNNEL_TOKEN to use quick tunnels"
            )
        check_target(target, self.edge_ports)
        args = ["--no-autoupdate", "--url", target]
        if target.startswith("https:"):
            args.append("--no-tls-verify")  # the edge's certificate is usually self-signed
        tunnel = Tunnel(
            id=tunnel_id or str(next(self._ids)), target=target, kind="quick", process=await self._spawn(args)
        )
        tunnel.reader = asyncio.create_task(self._read_output(tunnel))
        self._tunnels[tunnel.id] = tunnel
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(tunnel.url_found.wait(), self.url_timeout_s)
        if self._tunnels.get(tunnel.id) is not tunnel or tunnel.state in ("stopping", "stopped"):
            await self._terminate(tunnel)  # stopped (or refreshed) from the dashboard while it started
            raise TunnelError("the tunnel was stopped before cloudflared gave its URL")
        if tunnel.public_url is None:
            has_exited = tunnel.state == "exited"
            await self._terminate(tunnel)
            self._forget(tunnel)
            last = tunnel.output[-1] if tunnel.output else "no output"
            if has_exited:
                code = tunnel.process.returncode
                raise TunnelError(f"cloudflared exited (code {code}) before giving a tunnel URL: {last}")
            raise TunnelError(
                f"cloudflared gave no tunnel URL within {self.url_timeout_s:g} s (last line: {last})"
            )
        logger.info("quick tunnel %s: %s -> %s", tunnel.id, tunnel.public_url, target)
        return tunnel.describe()

    async def start_named(self) -> dict[str, Any]:
        """Run the named tunnel of CF_TUNNEL_TOKEN (passed in the environment, not on the command line);
        when it runs already, that one."""
        if not self.named_token:
            raise TunnelError("no CF_TUNNEL_TOKEN is set")
        running = self._tunnels.get("named")
        if running is not None and running.process.returncode is None:
            return running.describe()
        if running is not None:  # exited by itself: start it again
            await self.stop("named")
        process = await self._spawn(
            ["--no-autoupdate", "tunnel", "run"], env={"TUNNEL_TOKEN": self.named_token}
        )
        tunnel = Tunnel(
            id="named", target="(Cloudflare dashboard)", kind="named", process=process, state="running"
        )
        tunnel.reader = asyncio.create_task(self._read_output(tunnel))
        self._tunnels[tunnel.id] = tunnel
        logger.warning(NAMED_TUNNEL_WARNING)
        return tunnel.describe()

    def _get(self, tunnel_id: str) -> Tunnel:
        try:
            return self._tunnels[tunnel_id]
        except KeyError:
            raise TunnelNotFoundError(f"no tunnel {tunnel_id!r}") from None

    async def _terminate(self, tunnel: Tunnel) -> None:
        process = tunnel.process
        if process.returncode is None:
            # Before the signal: the reader, seeing the output end, must not take this for an exit of
            # its own (a start waiting for the URL tells the two apart by this state).
            tunnel.state = "stopping"
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        if tunnel.reader is not None:
            await tunnel.reader
        tunnel.state = "stopped"

    async def stop(self, tunnel_id: str) -> None:
        tunnel = self._get(tunnel_id)
        await self._terminate(tunnel)
        self._forget(tunnel)

    def _forget(self, tunnel: Tunnel) -> None:
        """Drops `tunnel` from the list unless a refresh has put a new one under its id meanwhile."""
        if self._tunnels.get(tunnel.id) is tunnel:
            del self._tunnels[tunnel.id]

    async def refresh(self, tunnel_id: str) -> dict[str, Any]:
        """Restart a tunnel: a quick one to the same target (it gets a new public URL), or the named one."""
        tunnel = self._get(tunnel_id)
        await self.stop(tunnel_id)
        if tunnel.kind == "named":
            return await self.start_named()
        return await self.start(tunnel.target, tunnel_id=tunnel_id)

    async def close(self) -> None:
        for tunnel_id in list(self._tunnels):
            await self.stop(tunnel_id)
