"""The live cluster dashboard served by every node at ``GET /dashboard``.

One static HTML file shipped as package data (``spawnmesh/ops/dashboard/index.html``): inline
CSS and JavaScript, no build step, no external assets. The page polls the serving node's
``GET /v1/cluster/status`` every second (members and their state, the ring, active actors with
search, recent errors, throughput from the invocation counters). The response carries a
Content-Security-Policy that allows only the page's own inline code and requests to its own
origin, so a browser would refuse any external asset even if one crept in.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Final

__all__ = ["DASHBOARD_CSP", "dashboard_html"]

DASHBOARD_CSP: Final = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
"""The ``content-security-policy`` of ``/dashboard``: inline code, same-origin fetches only."""


@functools.cache
def dashboard_html() -> bytes:
    """The dashboard page (read from the package once)."""
    return resources.files("spawnmesh.ops").joinpath("dashboard", "index.html").read_bytes()
