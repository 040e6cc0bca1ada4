"""Peer wire over TLS with mutual authentication (certificates made here with ``cryptography``)."""

from __future__ import annotations

import datetime
import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from spawnmesh.errors import AuthenticationFailed, PeerUnavailable
from spawnmesh.wire.messages import Request
from spawnmesh.wire.peer import PeerLimits, PeerNode
from spawnmesh.wire.transport import TlsConfig

LIMITS = PeerLimits(connect_timeout_ms=5000, drain_timeout_ms=2000)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(tmp: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def make_node_cert(
    tmp: Path, name: str, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]
) -> tuple[Path, Path]:
    ca_key, ca_cert, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsConfig]:
    tmp = tmp_path_factory.mktemp("pki")
    ca = make_ca(tmp, "cluster-ca")
    evil = make_ca(tmp, "evil-ca")
    out = {}
    for name in ("a", "b"):
        cert, key = make_node_cert(tmp, name, ca)
        out[name] = TlsConfig.from_files(cert, key, ca[2])
    cert, key = make_node_cert(tmp, "mallory", evil)
    out["mallory"] = TlsConfig.from_files(cert, key, ca[2])  # trusts us, we do not trust it
    checked_cert, checked_key = make_node_cert(tmp, "a-checked", ca)
    out["checked"] = TlsConfig.from_files(checked_cert, checked_key, ca[2], check_hostname=True)
    return out


async def echo(req: Request, origin: str) -> bytes | None:
    return origin.encode() + b":" + req.payload


def node(name: str, tls: TlsConfig) -> PeerNode:
    return PeerNode(name, 1, "c", echo, tls=tls, limits=LIMITS)


@asynccontextmanager
async def serving(*nodes: PeerNode) -> AsyncIterator[list[int]]:
    async with trio.open_nursery() as nursery:
        ports = [await nursery.start(n.serve, "127.0.0.1", 0) for n in nodes]
        yield ports
        for n in nodes:
            await n.close()


def request(payload: bytes = b"hi") -> Request:
    return Request(0, "sys", "actor", None, "echo", payload)


async def test_mutual_tls_carries_requests_both_ways(pki: dict[str, TlsConfig]) -> None:
    a, b = node("a", pki["a"]), node("b", pki["b"])
    async with serving(a, b) as (pa, pb):
        assert await a.request("b", ("127.0.0.1", pb), request()) == b"a:hi"
        assert await b.request("a", ("127.0.0.1", pa), request(b"x" * 100_000)) == (
            b"b:" + b"x" * 100_000
        )
        async with trio.open_nursery() as nursery:  # pipelined through the writer
            for i in range(50):
                nursery.start_soon(a.request, "b", ("127.0.0.1", pb), request(str(i).encode()))
        assert a.connected_peers == ["b"]


async def test_host_name_checking_when_asked_for(pki: dict[str, TlsConfig]) -> None:
    a, b = node("a", pki["checked"]), node("b", pki["b"])
    async with serving(a, b) as (_, pb):
        assert await a.request("b", ("127.0.0.1", pb), request()) == b"a:hi"


async def test_a_client_certificate_from_another_ca_is_rejected(
    pki: dict[str, TlsConfig], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "spawnmesh.wire")
    mallory, b = node("mallory", pki["mallory"]), node("b", pki["b"])
    async with serving(mallory, b) as (_, pb):
        with pytest.raises((AuthenticationFailed, PeerUnavailable)):
            await mallory.request("b", ("127.0.0.1", pb), request())
        with trio.fail_after(10):
            while b.stats.handshake_failures < 1:  # noqa: ASYNC110 - polling a counter
                await trio.sleep(0.01)
        assert "peer handshake from 127.0.0.1" in caplog.text
        assert b.connected_peers == []


async def test_a_client_without_tls_is_rejected(pki: dict[str, TlsConfig]) -> None:
    plain = PeerNode("p", 1, "c", echo, limits=LIMITS)
    b = node("b", pki["b"])
    async with serving(plain, b) as (_, pb):
        with pytest.raises((PeerUnavailable, AuthenticationFailed)):
            await plain.request("b", ("127.0.0.1", pb), request())
        with trio.fail_after(10):
            while b.stats.handshake_failures < 1:  # noqa: ASYNC110 - polling a counter
                await trio.sleep(0.01)


async def test_a_server_certificate_from_another_ca_is_rejected(
    pki: dict[str, TlsConfig],
) -> None:
    a, mallory = node("a", pki["a"]), node("mallory", pki["mallory"])
    async with serving(a, mallory) as (_, pm):
        with pytest.raises(AuthenticationFailed, match="TLS"):
            await a.request("mallory", ("127.0.0.1", pm), request())


async def test_a_drain_over_tls_delivers_the_last_replies(pki: dict[str, TlsConfig]) -> None:
    release = trio.Event()

    async def slow(req: Request, origin: str) -> bytes | None:
        await release.wait()
        return req.payload

    a = node("a", pki["a"])
    b = PeerNode("b", 1, "c", slow, tls=pki["b"], limits=LIMITS)
    got: list[bytes | None] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve, "127.0.0.1", 0)
        pb = await nursery.start(b.serve, "127.0.0.1", 0)

        async def call(i: int) -> None:
            got.append(await a.request("b", ("127.0.0.1", pb), request(b"%d" % i)))

        async with trio.open_nursery() as callers:
            for i in range(10):
                callers.start_soon(call, i)
            with trio.fail_after(10):
                while (conn := b.connection("a")) is None or conn.handling < 10:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            callers.start_soon(b.close)
            with trio.fail_after(10):
                while a.connection("b") is not None:  # noqa: ASYNC110 - GoAway arrived
                    await trio.sleep(0.01)
            release.set()
        assert sorted(got) == sorted(b"%d" % i for i in range(10))  # type: ignore[type-var]
        with trio.fail_after(10):
            while a.open_connections:  # noqa: ASYNC110 - closed cleanly by both sides
                await trio.sleep(0.01)
        await a.close()
