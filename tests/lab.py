"""A private network of hosts on one machine, for tests that need nodes as separate hosts.

Every namespace is new and made with ``unshare --net`` (held open by a ``sleep`` process), so no
packet can leave the machine: the *lab* namespace holds a bridge (``10.77.0.1/24``); each host
is its own network namespace with one veth on that bridge and its own address. Nothing is
named globally (no ``ip netns add``): namespaces are reached through their holder's
``/proc/PID/ns/net``, and disappear when the holders and the processes in them end.

* :meth:`Lab.entered` moves the calling thread into the lab namespace (``setns``): sockets it
  opens, threads and processes it starts are there too, which is how a test talks to the hosts
  and runs servers on the bridge (dnsmasq, PostgreSQL).
* :meth:`Lab.host_popen` runs a program on a host (``nsenter --net``).
* :class:`Dnsmasq` serves A and SRV records the way a Kubernetes headless Service does; records
  change by rewriting its configuration and restarting it (dnsmasq re-reads no SRV on SIGHUP).
* :class:`LabPostgres` is a throwaway PostgreSQL listening on the bridge address.

Also here: ``system``, the app the lab's nodes host (``--app lab:system`` with ``tests/`` on
``PYTHONPATH``): unnamed write-through counters.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spawnmesh import ActorSystem, Context, WriteThrough, action
from spawnmesh.actors.definition import Kind

# ----------------------------------------------------------------------------- the lab's app

system = ActorSystem("lab")


@dataclass
class Count:
    """A counter's value."""

    value: int = 0


@system.actor("counter", kind=Kind.UNNAMED, state=Count, snapshot=WriteThrough())
class Counter:
    """Invoke ``<any name>`` with parent ``counter``; durable before each reply."""

    @action
    async def add(self, ctx: Context[Count], n: int = 1) -> int:
        ctx.state = Count(ctx.state.value + int(n))
        return ctx.state.value

    @action
    async def value(self, ctx: Context[Count]) -> int:
        return ctx.state.value


# ----------------------------------------------------------------------------- namespaces

CLONE_NEWNET = 0x40000000
HOLD_S = 900
"""Holder processes exit by themselves after this long, should a test leak one."""


def missing_tools() -> list[str]:
    """Programs the lab needs that are not installed."""
    return [t for t in ("unshare", "nsenter", "ip", "dnsmasq") if shutil.which(t) is None]


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _run(argv: Sequence[str]) -> None:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        raise OSError(f"{' '.join(argv)}: exit {out.returncode}: {out.stderr.strip()}")


@dataclass
class Host:
    """A host of the lab: its own network namespace and address."""

    name: str
    ip: str
    holder: subprocess.Popen[bytes]

    @property
    def netns(self) -> str:
        return f"/proc/{self.holder.pid}/ns/net"


@dataclass
class Lab:
    """The bridge namespace and its hosts; :meth:`close` removes everything."""

    subnet: str = "10.77.0"
    holder: subprocess.Popen[bytes] | None = None
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def gateway(self) -> str:
        """The bridge's own address (the lab namespace's servers listen there)."""
        return f"{self.subnet}.1"

    @property
    def netns(self) -> str:
        assert self.holder is not None
        return f"/proc/{self.holder.pid}/ns/net"

    @staticmethod
    def _hold() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["unshare", "--net", "--", "sleep", str(HOLD_S)],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        own = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until `unshare` has exec'd `sleep` in the new ns
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise OSError(f"unshare --net failed: {err.strip()}")
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{proc.pid}/ns/net") != own and os.readlink(
                    f"/proc/{proc.pid}/exe"
                ).endswith("sleep"):
                    return proc
            time.sleep(0.005)
        proc.kill()
        raise OSError("unshare --net did not start")

    def in_ns(self, netns: str, *argv: str) -> None:
        _run(["nsenter", f"--net={netns}", "--", *argv])

    def open(self) -> None:
        """Make the lab namespace with the bridge up at the gateway address."""
        self.holder = self._hold()
        for cmd in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "link", "add", "br0", "type", "bridge"],
            ["ip", "addr", "add", f"{self.gateway}/24", "dev", "br0"],
            ["ip", "link", "set", "br0", "up"],
        ):
            self.in_ns(self.netns, *cmd)

    def add_host(self, name: str, last_octet: int) -> Host:
        """A new host namespace wired to the bridge at ``subnet.last_octet``."""
        host = Host(name, f"{self.subnet}.{last_octet}", self._hold())
        self.hosts[name] = host
        veth = f"v{last_octet}"
        self.in_ns(
            self.netns,
            "ip",
            "link",
            "add",
            veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            str(host.holder.pid),
        )
        self.in_ns(self.netns, "ip", "link", "set", veth, "master", "br0", "up")
        for cmd in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "add", f"{host.ip}/24", "dev", "eth0"],
            ["ip", "link", "set", "eth0", "up"],
        ):
            self.in_ns(host.netns, *cmd)
        return host

    def host_popen(
        self,
        host: Host,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        stdout: Path,
        stderr: Path,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` on ``host`` in its own session, output to files."""
        with stdout.open("ab") as out, stderr.open("ab") as err:
            return subprocess.Popen(
                ["nsenter", f"--net={host.netns}", "--", *argv],
                env=dict(env),
                cwd=cwd,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the block with this thread in the lab namespace (see the module doc)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        lab = os.open(self.netns, os.O_RDONLY)
        try:
            _setns(lab)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(lab)
            os.close(own)

    def close(self) -> None:
        for h in [*self.hosts.values()]:
            _stop(h.holder)
        if self.holder is not None:
            _stop(self.holder)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


@contextlib.contextmanager
def lab(subnet: str = "10.77.0") -> Iterator[Lab]:
    """An open :class:`Lab`, closed when the block ends."""
    it = Lab(subnet)
    try:
        it.open()
        yield it
    finally:
        it.close()


# ----------------------------------------------------------------------------- DNS


@dataclass
class Dnsmasq:
    """dnsmasq on ``listen`` (start it inside :meth:`Lab.entered`), authoritative for what
    :meth:`publish` says and for nothing else (no upstream, no /etc/hosts)."""

    listen: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    def publish(self, service: str, srv: str, pods: Mapping[str, str], port: int) -> None:
        """Records of a headless Service: ``service`` has one A record per pod, each pod
        ``<pod>.<service>`` its A record, and ``srv`` one SRV record per pod (its port)."""
        zone = service.split(".", 1)[1]  # answer for the whole zone: no data, not REFUSED
        lines = [f"local=/{zone}/"]
        lines += [f"host-record={service},{ip}" for ip in pods.values()]
        lines += [f"host-record={pod}.{service},{ip}" for pod, ip in pods.items()]
        lines += [f"srv-host={srv},{pod}.{service},{port},0,10" for pod in pods]
        self.restart(lines)

    def restart(self, records: Sequence[str]) -> None:
        self.stop()
        conf = self.workdir / "dnsmasq.conf"
        conf.write_text("\n".join(records) + "\n")
        log = self.workdir / "dnsmasq.log"
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    "dnsmasq",
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--no-poll",
                    "--bind-interfaces",
                    f"--listen-address={self.listen}",
                    "--port=53",
                    "--user=root",
                    "--pid-file",
                    f"--conf-file={conf}",
                    "--log-queries",
                    f"--log-facility={log}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 10
        while not _dns_answers(self.listen):  # listening again before anyone asks
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise OSError(f"dnsmasq did not start: {log.read_text()[-500:]}")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None


def _dns_answers(server: str) -> bool:
    """Whether a DNS server answers a query for ``.`` on UDP port 53."""
    query = bytes.fromhex("abcd010000010000000000000000020001")  # id, RD, 1 question: . NS
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        try:
            s.sendto(query, (server, 53))
            return s.recv(512)[:2] == query[:2]
        except OSError:
            return False


# ----------------------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian layout), if any."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


@dataclass
class LabPostgres:
    """A throwaway PostgreSQL on ``host:port`` (start it inside :meth:`Lab.entered`), run as
    the ``postgres`` user in a private directory with durability off; database ``spawnmesh``."""

    host: str
    port: int = 5432
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="spawnmesh-lab-pg.")))
    started: bool = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/spawnmesh"

    def _pg(self, tool: str, *args: str) -> None:
        pg = postgres_bin()
        assert pg is not None
        _run(["runuser", "-u", "postgres", "--", str(pg / tool), *args])

    def start(self) -> None:
        os.chmod(self.dir, 0o755)
        shutil.chown(self.dir, "postgres")
        data = self.dir / "data"
        self._pg(
            "initdb",
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        )
        with (data / "pg_hba.conf").open("a") as hba:  # the lab's hosts, without a password
            hba.write(f"host all all {self.host}/24 trust\n")
        opts = (
            f"-p {self.port} -k {self.dir} -c listen_addresses={self.host} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._pg(
            "pg_ctl",
            "-D",
            str(data),
            "-l",
            str(self.dir / "log"),
            "-w",
            "-t",
            "60",
            "-o",
            opts,
            "start",
        )
        self.started = True
        self._pg(
            "psql",
            "-h",
            str(self.dir),
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-qAt",
            "-c",
            "CREATE DATABASE spawnmesh",
        )

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(OSError):
                self._pg("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)


def kill_session(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process started in its own session, and its whole group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
