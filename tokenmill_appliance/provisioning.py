"""PROVISIONING_SCRIPT: a user's shell script run once, at the first boot of a machine (spec section 6).

Boot decides (`prepare_provisioning`): the script runs when it is set and no earlier run succeeded on
this machine. It then creates the `/.provisioning` marker, which every other program waits on, and adds
the `provisioning` supervisor program, which fetches and runs the script (`provisioning_command`),
records a success (`finish_provisioning`) and always removes the marker. A failure is logged and the
machine comes up anyway; the script runs again at the next boot.
"""

from __future__ import annotations

import base64
import http.client
import os
import shutil
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

from tokenmill_appliance.settings import Settings

DOWNLOAD_TIMEOUT_S = 60


class ProvisioningError(RuntimeError):
    """The script could not be fetched; the message says what and where."""


def done_marker(settings: Settings) -> Path:
    """Written after a successful run, so the script never runs twice on this machine."""
    return settings.path("/etc/tokenmill/provisioning.done")


def script_copy(settings: Settings) -> Path:
    return settings.path("/var/lib/tokenmill/provisioning.sh")


def is_url(source: str) -> bool:
    return source.split(":", 1)[0].lower() in ("http", "https") and "://" in source


def display_source(source: str) -> str:
    """The script's source for logs: a URL without its credentials and query (they may hold a token)."""
    if not is_url(source):
        return source
    try:
        parts = urlparse(source)
    except ValueError:
        return "(a malformed URL)"
    host = parts.netloc.rpartition("@")[2]  # the user and password are dropped
    return f"{parts.scheme}://{host}{parts.path}" + ("?..." if parts.query else "")


def download_request(source: str) -> urllib.request.Request:
    """A request for URL `source`; `user:password@` in it (which urllib cannot send) becomes basic auth."""
    parts = urlparse(source)
    if "@" not in parts.netloc:
        return urllib.request.Request(source)
    request = urllib.request.Request(parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl())
    credentials = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    # Unredirected: a redirect to another host must not carry the credentials along.
    request.add_unredirected_header(
        "Authorization", "Basic " + base64.b64encode(credentials.encode()).decode()
    )
    return request


def prepare_provisioning(settings: Settings) -> bool:
    """At boot: drop a stale marker (a boot cut short), then create it if the script must run now."""
    marker = settings.provisioning_marker
    marker.unlink(missing_ok=True)
    if not settings.provisioning_script or done_marker(settings).exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"provisioning from {display_source(settings.provisioning_script)}\n", encoding="utf-8")
    return True


def local_script(settings: Settings, source: str) -> Path:
    """A local script path: an absolute one under TOKENMILL_ROOT (or as given, when only that file exists),
    a relative one under WORKSPACE."""
    path = Path(source)
    if not path.is_absolute():
        path = settings.workspace / path
    elif settings.path(path).is_file() or not path.is_file():
        path = settings.path(path)
    if not path.is_file():
        raise ProvisioningError(f"PROVISIONING_SCRIPT {source!r}: no such file ({path})")
    return path


def fetch_script(settings: Settings) -> Path:
    """Copy (or download) the script to a private file and return its path."""
    source = settings.provisioning_script
    target = script_copy(settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    if is_url(source):
        try:
            request = download_request(source)
            with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response, tmp.open("wb") as f:
                shutil.copyfileobj(response, f)
        except (OSError, ValueError, http.client.HTTPException) as exc:  # ValueError: a malformed URL
            tmp.unlink(missing_ok=True)
            raise ProvisioningError(
                f"cannot download PROVISIONING_SCRIPT {display_source(source)}: {exc}"
            ) from None
    else:
        shutil.copyfile(local_script(settings, source), tmp)
    os.chmod(tmp, 0o700)
    os.replace(tmp, target)
    return target


def provisioning_command(script: Path) -> list[str]:
    """Run a script with a `#!` line as itself, anything else with bash."""
    with script.open("rb") as f:
        has_shebang = f.read(2) == b"#!"
    return [str(script)] if has_shebang else ["bash", str(script)]


def finish_provisioning(settings: Settings, returncode: int) -> None:
    """Record a success (never run again) and remove the marker, so the other programs start."""
    if returncode == 0:
        marker = done_marker(settings)
        marker.parent.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        marker.write_text(f"{stamp} {display_source(settings.provisioning_script)}\n", encoding="utf-8")
    settings.provisioning_marker.unlink(missing_ok=True)
