"""`tokenmill portal`: read the settings and portal.yaml, run the edge, the dashboard and the tunnels."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from tokenmill_appliance.portal.server import Portal
from tokenmill_appliance.portal_apps import PortalApp, load_apps
from tokenmill_appliance.settings import Settings, SettingsError, mask_token

logger = logging.getLogger("tokenmill_appliance.portal")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tokenmill portal",
        description="The authenticating TLS edge for the apps of portal.yaml, the dashboard, the tunnels.",
    )
    parser.add_argument(
        "--host", default=None, help="address of the external ports (default: PORTAL_HOST or 0.0.0.0)"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def login_hint(settings: Settings, portal: Portal) -> str:
    """The one start-up line that says how to log in; the token is masked but for its last 4 characters."""
    if not settings.enable_auth:
        return "auth is off (ENABLE_AUTH=false): every port is open"
    scheme = "https" if portal.ssl_context is not None else "http"
    masked = mask_token(settings.open_button_token)
    where = f"{scheme}://<this host>:{portal.portal_app.external_port}/?token={masked}"
    source = f"the token in {settings.token_file}" if settings.is_token_generated else "OPEN_BUTTON_TOKEN"
    return f"log in at {where} (with {source}), or as user {settings.web_username!r} with WEB_PASSWORD"


async def serve(settings: Settings, apps: list[PortalApp], host: str) -> None:
    portal = Portal(settings, apps, bind_host=host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await portal.start()
    try:
        logger.info("portal listening on ports %s", ", ".join(map(str, portal.listening_ports)))
        logger.info(login_hint(settings, portal))
        await stop.wait()
    finally:
        await portal.stop()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        settings = Settings.from_env()
        apps = load_apps(settings)
    except SettingsError as exc:
        print(f"tokenmill portal: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(settings, apps, args.host or settings.portal_host))
    return 0
