"""The apps of portal.yaml (spec section 2): what the portal proxies, and where.

`load_apps()` reads portal.yaml, writing it from PORTAL_CONFIG when it is missing; boot writes it fresh.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tokenmill_appliance.settings import Settings, SettingsError, atomic_write_text

logger = logging.getLogger(__name__)

PORTAL_APP_NAME = "Instance Portal"
API_APP_NAME = "vLLM API"
RAY_APP_NAME = "Ray Dashboard"


class PortalConfigError(SettingsError):
    """A malformed PORTAL_CONFIG entry or portal.yaml."""


@dataclass(frozen=True)
class PortalApp:
    """One app of portal.yaml: `hostname:external_port:local_port:url_path:Name`."""

    name: str
    hostname: str
    external_port: int
    internal_port: int
    open_path: str = "/"

    @property
    def is_proxied(self) -> bool:
        """The portal listens on external_port and proxies to hostname:internal_port only when they differ."""
        return self.external_port != self.internal_port

    def to_yaml(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname,
            "external_port": self.external_port,
            "internal_port": self.internal_port,
            "open_path": self.open_path,
            "name": self.name,
        }


def find_app(apps: list[PortalApp], name: str) -> PortalApp | None:
    """The app called `name` (case-insensitive, as users retype names in PORTAL_CONFIG)."""
    wanted = name.casefold()
    return next((app for app in apps if app.name.casefold() == wanted), None)


def _port(value: object, what: str, entry: str) -> int:
    try:
        port = int(str(value).strip())
    except ValueError:
        raise PortalConfigError(f"{what} {value!r} is not an integer in app entry {entry!r}") from None
    if not 0 < port < 65536:
        raise PortalConfigError(f"{what} {port} is out of range 1-65535 in app entry {entry!r}")
    return port


def _check_shared_ports(apps: list[PortalApp]) -> list[PortalApp]:
    proxied: dict[int, str] = {}
    for app in apps:
        if not app.is_proxied:
            continue
        if app.external_port in proxied:
            raise PortalConfigError(
                f"apps {proxied[app.external_port]!r} and {app.name!r} both proxy external port "
                f"{app.external_port}: only one may; give one of them another port"
            )
        proxied[app.external_port] = app.name
    return apps


def parse_portal_config(text: str) -> list[PortalApp]:
    """Parse PORTAL_CONFIG (`hostname:ext:int:path:Name` entries joined by `|`), order kept.

    A later entry with the same name replaces the earlier one in its place. Raises PortalConfigError
    naming the malformed entry.
    """
    apps: dict[str, PortalApp] = {}
    for raw in text.split("|"):
        entry = raw.strip()
        if not entry:
            continue
        parts = entry.split(":", 4)
        if len(parts) != 5:
            raise PortalConfigError(
                f"PORTAL_CONFIG entry {entry!r} has {len(parts)} fields; "
                "expected hostname:external_port:local_port:url_path:Name"
            )
        hostname, external, internal, path, name = (part.strip() for part in parts)
        if not hostname or not name:
            raise PortalConfigError(f"PORTAL_CONFIG entry {entry!r} needs a hostname and a name")
        apps[name] = PortalApp(
            name=name,
            hostname=hostname,
            external_port=_port(external, "external port", entry),
            internal_port=_port(internal, "local port", entry),
            open_path=path or "/",
        )
    return _check_shared_ports(list(apps.values()))


def apps_from_yaml(data: object, source: str = "portal.yaml") -> list[PortalApp]:
    """Apps from the parsed content of portal.yaml; PortalConfigError when it is not the expected shape."""
    if not isinstance(data, dict) or not isinstance(data.get("applications"), dict):
        raise PortalConfigError(f"{source} has no 'applications' mapping")
    apps: list[PortalApp] = []
    for key, item in data["applications"].items():
        entry = f"{source}: {key}"
        if not isinstance(item, dict):
            raise PortalConfigError(f"{entry} is not a mapping")
        hostname = str(item.get("hostname") or "").strip()
        if not hostname:
            raise PortalConfigError(f"{entry} has no hostname")
        apps.append(
            PortalApp(
                name=str(item.get("name") or key),
                hostname=hostname,
                external_port=_port(item.get("external_port"), "external_port", entry),
                internal_port=_port(item.get("internal_port"), "internal_port", entry),
                open_path=str(item.get("open_path") or "/"),
            )
        )
    return _check_shared_ports(apps)


def read_portal_yaml(path: Path) -> list[PortalApp] | None:
    """The apps of an existing portal.yaml; None when it is missing or empty.

    Raises PortalConfigError when the file exists but is not valid.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    if not text.strip():
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PortalConfigError(f"{path} is not valid YAML: {exc}") from None
    apps = apps_from_yaml(data, str(path))
    return apps or None


def write_portal_yaml(path: Path, apps: list[PortalApp]) -> None:
    """Write apps atomically as `applications: {Name: {hostname, external_port, ...}}`, order kept."""
    data = {"applications": {app.name: app.to_yaml() for app in apps}}
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


def default_apps(settings: Settings) -> list[PortalApp]:
    """The apps of PORTAL_CONFIG (or its default)."""
    return parse_portal_config(settings.portal_config)


def load_apps(settings: Settings) -> list[PortalApp]:
    """The apps of portal.yaml, writing it from PORTAL_CONFIG when it is missing or empty.

    An existing valid non-empty portal.yaml wins. An invalid one is left for the user to fix (logged)
    and PORTAL_CONFIG is used meanwhile.
    """
    path = settings.portal_yaml
    try:
        existing = read_portal_yaml(path)
    except PortalConfigError as exc:
        logger.error("ignoring %s until it is fixed: %s; using PORTAL_CONFIG", path, exc)
        return default_apps(settings)
    if existing:
        return existing
    apps = default_apps(settings)
    write_portal_yaml(path, apps)
    return apps
