"""The portal: the authenticating TLS edge in front of every app, the dashboard UI and the tunnel manager.

`edge` listens on the external ports (auth from `auth`, TLS from `tls`, proxying from `proxy`); `ui` serves
the dashboard and its JSON API on the portal's internal port, using `logs`, `services`, `tunnels` and
`metrics`; `server.Portal` starts and stops all of it and `main` is the `tokenmill portal` command.
"""
