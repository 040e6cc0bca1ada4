"""``GET /dashboard``: one self-contained page (no build step, no external asset, a CSP that
forbids them), served by an embedded node; the endpoint it polls answers. The page itself is
driven in a real browser by ``tests/test_dashboard_browser.py``."""

from __future__ import annotations

import json
import re
import urllib.request

import trio

from spawnmesh import Node
from spawnmesh.ops.dashboard import DASHBOARD_CSP, dashboard_html
from tests.conftest import NodeFactory
from tests.test_mesh import mesh


def fetch(node: Node, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{node.ops_port}{path}", method=method)
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, dict(response.headers), response.read()


def test_the_page_is_self_contained() -> None:
    html = dashboard_html().decode()
    assert html.startswith("<!doctype html>")
    # no external asset of any kind: every src/href is local or a data: URL
    for attr in re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html):
        assert attr.startswith("data:"), attr
    assert '<link rel="stylesheet"' not in html and "@import" not in html
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", html), "external URL"
    assert "url(" not in html
    # the one endpoint it reads is the cluster status, relative to the serving node
    assert re.findall(r'"/v1/[a-z/]+', html) == ['"/v1/cluster/status']
    assert "setInterval(poll, POLL_MS)" in html and "const POLL_MS = 1000;" in html


async def test_every_node_serves_the_dashboard(make_node: NodeFactory) -> None:
    async with make_node(mesh, name="dash") as node:
        status, headers, body = await trio.to_thread.run_sync(fetch, node, "/dashboard")
        assert status == 200
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert headers["content-security-policy"] == DASHBOARD_CSP
        assert "default-src 'none'" in DASHBOARD_CSP and "connect-src 'self'" in DASHBOARD_CSP
        assert body == dashboard_html()
        status, headers, body = await trio.to_thread.run_sync(fetch, node, "/dashboard", "HEAD")
        assert status == 200 and body == b""
        assert int(headers["content-length"]) == len(dashboard_html())

        status, _h, raw = await trio.to_thread.run_sync(
            fetch, node, "/v1/cluster/status?actors=200"
        )
        doc = json.loads(raw)
        assert status == 200 and doc["self"] == "dash"
        (me,) = doc["members"]
        assert me["self"] is True and me["node"]["name"] == "dash" and me["node"]["actors"] == []
