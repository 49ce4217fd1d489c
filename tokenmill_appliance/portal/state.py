"""What the dashboard's handlers share, kept apart so `ui` and `api` can both import it."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from tokenmill_appliance.portal.auth import Authenticator
from tokenmill_appliance.portal.edge import EdgeSecret
from tokenmill_appliance.portal.metrics import MetricsSampler
from tokenmill_appliance.portal.services import ProgramControl
from tokenmill_appliance.portal.tunnels import TunnelManager
from tokenmill_appliance.portal_apps import PortalApp
from tokenmill_appliance.settings import Settings


@dataclass
class PortalState:
    """What the dashboard's handlers share."""

    settings: Settings
    apps: list[PortalApp]
    auth: Authenticator
    edge_secret: EdgeSecret
    session: aiohttp.ClientSession
    supervisor: ProgramControl
    tunnels: TunnelManager
    metrics: MetricsSampler
    is_tls: bool
    portal_port: int
    """The portal's external port: its AUTH_EXCLUDE status also applies on the internal port."""


STATE = web.AppKey("state", PortalState)
IS_AUTHENTICATED = web.RequestKey("is_authenticated", bool)
