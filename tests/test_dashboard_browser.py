"""The dashboard in a real headless browser (Debian's chromium) against three real
``spawnmesh run`` processes: the members appear alive with the ring, actors, search, errors and
throughput filled in, no script error or CSP violation is reported, a SIGKILLed node is shown
dead, and a screenshot is saved to ``.artifacts/dashboard.png`` (its path is printed).

Chromium is driven through the DevTools protocol over ``--remote-debugging-pipe`` (JSON
messages separated by NUL bytes on file descriptors 3 and 4), which needs no websocket client.
``scripts/browser-deps.sh`` installs chromium where it can (as root, with apt-get); elsewhere the
test is skipped with the script's reason.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import NodeProcess, http_post_json, killing, run_cli, start_node, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / ".artifacts" / "dashboard.png"

FAST = (
    "--statestore", "memory://",
    "--set", "cluster.preset=local",
    "--set", "cluster.probe_interval_ms=500",
    "--set", "cluster.join_retry_min_ms=200",
    "--set", "cluster.join_retry_max_ms=1000",
)  # fmt: skip
"""Probes every 500 ms: a SIGKILLed node is declared dead within a few seconds."""


def chromium_path() -> str:
    """Install chromium if needed (scripts/browser-deps.sh) or skip with the reason."""
    try:
        done = subprocess.run(
            ["bash", str(ROOT / "scripts" / "browser-deps.sh")],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"chromium could not be installed: {exc}")
    if done.returncode != 0:
        pytest.skip(f"chromium is not available: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().splitlines()[-1]


class Browser:
    """A headless chromium and one DevTools session on one page, over the pipe transport."""

    def __init__(self, exe: str, profile: Path) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def fds() -> None:  # in the child: the pipe ends become fds 3 (commands) and 4 (events)
            a, b = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--remote-debugging-pipe", "--no-sandbox",
             "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--mute-audio",
             "--hide-scrollbars", f"--user-data-dir={profile}", "--window-size=1400,1000",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=fds, pass_fds=(3, 4), start_new_session=True,
        )  # fmt: skip
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._next = 0
        self.events: list[dict[str, Any]] = []
        self.session = ""

    def send(self, method: str, params: dict[str, Any] | None = None, *, session: bool = True,
             timeout: float = 30.0) -> dict[str, Any]:  # fmt: skip
        """Send one command and wait for its answer (events meanwhile are kept)."""
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            for reply in self._read(deadline):
                if reply.get("id") == self._next:
                    if "error" in reply:
                        raise AssertionError(f"{method}: {reply['error']}")
                    result: dict[str, Any] = reply.get("result", {})
                    return result
                self.events.append(reply)

    def _read(self, deadline: float) -> list[dict[str, Any]]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("chromium did not answer in time")
        ready, _w, _x = select.select([self._from_child], [], [], left)
        if not ready:
            raise AssertionError("chromium did not answer in time")
        chunk = os.read(self._from_child, 1 << 20)
        if not chunk:
            raise AssertionError("chromium closed the DevTools pipe")
        self._buf += chunk
        *complete, self._buf = self._buf.split(b"\0")
        return [json.loads(m) for m in complete if m]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)
        attached = self.send(
            "Target.attachToTarget",
            {"targetId": target["targetId"], "flatten": True},
            session=False,
        )
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
        )
        self.send("Page.navigate", {"url": url})

    def eval(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        out = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in out:
            raise AssertionError(f"{expression}: {out['exceptionDetails']}")
        return out["result"].get("value")

    def problems(self) -> list[str]:
        """Script exceptions and console/log errors reported so far (CSP violations are
        reported as errors)."""
        out = []
        for ev in self.events:
            method = ev.get("method")
            params = ev.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                out.append(json.dumps(params["entry"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                out.append(json.dumps(params.get("args", []))[:500])
        return out

    def screenshot(self, path: Path) -> None:
        shot = self.send("Page.captureScreenshot", {"format": "png"})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._to_child)
        with contextlib.suppress(OSError):
            os.close(self._from_child)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait(10)


@contextlib.contextmanager
def browser(exe: str, profile: Path) -> Iterator[Browser]:
    b = Browser(exe, profile)
    try:
        yield b
    finally:
        b.close()


MEMBERS_JS = (
    "JSON.stringify(Object.fromEntries([...document.querySelectorAll('#members tbody tr')]"
    ".map(r => [r.dataset.member, r.dataset.status])))"
)


def members_shown(b: Browser) -> dict[str, str]:
    return json.loads(b.eval(MEMBERS_JS) or "{}")


def start_cluster(tmp: Path) -> list[NodeProcess]:
    first = start_node(tmp / "a", "--name", "a", *FAST, key=None, url="memory://")
    nodes = [first]
    try:
        seed = json.loads(first.get("/v1/members")[1])["gossip_address"]
        for name in ("b", "c"):
            nodes.append(start_node(tmp / name, "--name", name, *FAST,
                                    "--set", f"cluster.seeds={seed}", key=None,
                                    url="memory://"))  # fmt: skip
    except BaseException:
        for n in nodes:
            n.kill()
        raise
    return nodes


@contextlib.contextmanager
def cart_load(node: NodeProcess, carts: int = 24) -> Iterator[list[int]]:
    """A client adding items to ``carts`` unnamed carts through ``node`` (spread over the
    ring) until the block ends; yields [acknowledged, failed]."""
    counts = [0, 0]
    stop = threading.Event()

    def client() -> None:
        i = 0
        while not stop.is_set():
            url = f"{node.url}/v1/systems/examples/actors/cart-{i % carts}/actions/add_item"
            try:
                status, _ = http_post_json(
                    url, {"payload": {"sku": f"s{i % 5}"}, "parent": "cart"}, timeout=5
                )
            except (OSError, ValueError):
                status = 0
            counts[0 if status == 200 else 1] += 1
            i += 1
            time.sleep(0.01)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        yield counts
    finally:
        stop.set()
        thread.join(10)


def test_dashboard_in_a_real_browser(tmp_path: Path) -> None:
    exe = chromium_path()
    nodes = start_cluster(tmp_path)
    a, b, c = nodes
    with killing(*nodes), browser(exe, tmp_path / "profile") as page, cart_load(b) as load:

        def converged() -> bool:
            for n in nodes:
                rows = json.loads(n.get("/v1/members")[1])["members"]
                if sorted(r["name"] for r in rows if r["status"] == "alive") != ["a", "b", "c"]:
                    return False
            return True

        wait_for(converged, "three members alive in every view", 30)
        for i, node in enumerate(nodes):  # the named counter, through every member
            status, _ = http_post_json(
                f"{node.url}/v1/systems/examples/actors/counter/actions/add", {"payload": i}
            )
            assert status == 200
        assert run_cli("invoke", "--node", a.url, "examples", "nosuch", "get").returncode == 1

        page.open(f"{a.url}/dashboard")
        wait_for(lambda: members_shown(page) == {"a": "alive", "b": "alive", "c": "alive"},
                 "the three members shown alive", 30,
                 describe=lambda: f"shown: {members_shown(page)}")  # fmt: skip

        def ring() -> dict[str, list[str]]:
            return json.loads(page.eval(
                "JSON.stringify(Object.fromEntries([...document.querySelectorAll("
                "'#ring tbody tr')].map(r => [r.dataset.type, [...r.cells].slice(1, -1)"
                ".map(c => c.textContent)])))"))  # fmt: skip

        wait_for(lambda: load[0] >= 48, "carts created on every member", 30)
        wait_for(lambda: len(ring().get("examples/cart", [])) == 3
                 and all(int(n) > 0 for n in ring()["examples/cart"]),
                 "carts owned by all three members in the ring", 15,
                 describe=lambda: f"ring: {ring()}")  # fmt: skip
        assert "examples/counter" in ring()
        errors = page.eval("document.querySelector('#errors tbody').textContent")
        assert "examples/nosuch.get" in errors and "actor_not_found" in errors
        assert page.eval("document.getElementById('served-by').textContent") == "served by a"

        def rate() -> float | None:
            text = page.eval("document.getElementById('rate-total').textContent")
            return float(text) if text not in ("\u2013", "0.0") else None

        assert wait_for(rate, "a throughput figure above 0 (two polls under load)", 15) > 0

        # search: only matching actors stay listed
        page.eval("(() => { const s = document.getElementById('search'); s.value = 'count';"
                  " s.dispatchEvent(new Event('input')); return true; })()")  # fmt: skip

        def actors_listed() -> list[str] | None:
            names = json.loads(page.eval(
                "JSON.stringify([...document.querySelectorAll('#actors tbody tr')]"
                ".map(r => r.dataset.actor))"))  # fmt: skip
            return names if names and all("count" in n for n in names) else None

        assert wait_for(actors_listed, "the search applied", 15) == ["examples/counter"]
        page.eval("(() => { const s = document.getElementById('search'); s.value = 'cart-1';"
                  " s.dispatchEvent(new Event('input')); return true; })()")  # fmt: skip

        def carts_listed() -> list[str] | None:
            names = json.loads(page.eval(
                "JSON.stringify([...document.querySelectorAll('#actors tbody tr')]"
                ".map(r => r.dataset.actor))"))  # fmt: skip
            return names if names and all("cart-1" in n for n in names) else None

        assert sorted(wait_for(carts_listed, "the cart search applied", 15)) == sorted(
            f"examples/cart-{i}" for i in range(24) if "cart-1" in f"cart-{i}")  # fmt: skip

        # a node dies: the dashboard says so
        c.kill()
        wait_for(lambda: members_shown(page).get("c") == "dead", "c shown dead", 45,
                 describe=lambda: f"shown: {members_shown(page)}")  # fmt: skip
        assert members_shown(page) == {"a": "alive", "b": "alive", "c": "dead"}
        assert page.problems() == [], page.problems()
        page.screenshot(SCREENSHOT)
        assert SCREENSHOT.stat().st_size > 10_000
        print(f"\ndashboard screenshot: {SCREENSHOT}")
