"""TLS on every hop (common/tls.py, services/certs.py, services/nats_server.py), on real parts: gRPC
servers and channels on loopback built by common/rpc.py, a real nats-server, the real nats-py client.

* plaintext to a TLS port fails cleanly (UNAVAILABLE) and the server keeps serving;
* a client certificate from another CA is refused at a front door that requires one, and anywhere
  inside (internal servers are mutual TLS);
* the verified client certificate's subject reaches `peer_subject` (tenants map it);
* a request forged on NATS without credentials is refused by nats-server, and a service user cannot
  do another service's part (publish requests, read token streams).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import stat
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import rpc, subjects, tls
from services import certs


def sync(test):
    """Run an async test body in a fresh event loop (the suite has no asyncio plugin)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return run


@pytest.fixture(scope="module")
def cert_dirs(tmp_path_factory):
    """Two independent CAs: `ours` (the stack's) and `theirs` (someone else's)."""
    ours = certs.generate(tmp_path_factory.mktemp("ours"), clients=["team-a"])
    theirs = certs.generate(tmp_path_factory.mktemp("theirs"), clients=["team-a"])
    return ours, theirs


def tls_cfg(tls_dir, client_auth: str = "none") -> SimpleNamespace:
    """The TLS keys of a StackConfig (common/config.py)."""
    return SimpleNamespace(tls=True, tls_dir=str(tls_dir), tls_cert="", tls_key="", tls_ca="", tls_client_ca="",
                           tls_client_auth=client_auth)


@pytest.fixture(autouse=True)
def no_process_tls():
    """Each test sets this process's TLS itself; none leaks into other tests."""
    tls.configure(None)
    yield
    tls.configure(None)


class SubjectHealth(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 Check that records the caller's certificate subject (peer_subject)."""

    def __init__(self):
        self.subjects: list[str | None] = []

    async def Check(self, request, context):
        self.subjects.append(tls.peer_subject(context))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@contextlib.asynccontextmanager
async def serving(settings: tls.TlsSettings):
    """A gRPC server built the way every service builds one (common/rpc.py) under `settings`."""
    tls.configure(settings)
    srv = rpc.server()
    servicer = SubjectHealth()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
    port = rpc.bind(srv, "127.0.0.1", 0)
    await srv.start()
    tls.configure(None)
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await srv.stop(None)


async def check(target: str, client: tls.TlsSettings | None) -> grpc.StatusCode:
    """One Health.Check through rpc.channel under `client` (None: plaintext); OK or the error's code."""
    tls.configure(client)
    try:
        async with rpc.channel(target) as ch:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()
    finally:
        tls.configure(None)


def client(d, cn: str | None = None) -> tls.TlsSettings:
    """A client trusting our CA (d: our cert folder), with client-<cn> from folder d when cn is given."""
    return tls.client_settings(str(d / "ca.pem"), str(d / f"client-{cn}.pem") if cn else "",
                               str(d / f"client-{cn}-key.pem") if cn else "")


def test_certs_writes_a_ca_service_certificates_client_certificates_and_nats_passwords(cert_dirs):
    from cryptography import x509
    ours, _ = cert_dirs
    for name in tls.SERVICE_CERTS:
        assert (ours / f"{name}.pem").exists() and (ours / f"{name}-key.pem").exists()
    cert = x509.load_pem_x509_certificate((ours / "client-team-a.pem").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=team-a"
    san = x509.load_pem_x509_certificate((ours / "router.pem").read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    for private in ("ca-key.pem", "router-key.pem", tls.NATS_USERS_FILE):
        assert stat.S_IMODE(os.stat(ours / private).st_mode) == 0o600, private
    assert set(json.loads((ours / tls.NATS_USERS_FILE).read_text())) == set(tls.NATS_USERS)


def test_certs_run_again_keeps_the_ca_and_adds_a_client(tmp_path):
    d = certs.generate(tmp_path)
    ca = (d / "ca.pem").read_bytes()
    passwords = (d / tls.NATS_USERS_FILE).read_text()
    assert certs.main(["--out", str(d), "--client", "team-b"]) == 0
    assert (d / "ca.pem").read_bytes() == ca and (d / tls.NATS_USERS_FILE).read_text() == passwords
    assert (d / "client-team-b.pem").exists()
    assert certs.main(["--out", str(d), "--client", "bad name/x"]) == 2


def test_tls_settings_say_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="tls_dir"):
        tls.settings_from(SimpleNamespace(tls=True, tls_dir="", tls_cert="", tls_key="", tls_ca="",
                                          tls_client_ca="", tls_client_auth="none"), "router")
    with pytest.raises(ValueError, match="cannot read the front door certificate .*router.pem"):
        tls.settings_from(tls_cfg(tmp_path / "nowhere"), "router")
    with pytest.raises(ValueError, match="none, required"):
        tls.settings_from(tls_cfg(tmp_path, client_auth="optional"), "router")
    assert tls.settings_from(SimpleNamespace(tls=False), "router") is None
    assert tls.nats_user("batcher-w3") == "batcher" and tls.nats_user("embedding-batcher-e0") == "batcher"
    assert tls.nats_user("openai_http") == "http_front" and tls.nats_user("my-tool") == "service"


@sync
async def test_plaintext_to_a_tls_port_is_unavailable_and_the_server_keeps_serving(cert_dirs):
    ours, _ = cert_dirs
    async with serving(tls.settings_from(tls_cfg(ours), "router")) as (target, _):
        assert await check(target, None) == grpc.StatusCode.UNAVAILABLE
        assert await check(target, client(ours)) == grpc.StatusCode.OK   # still serving, TLS works
        assert await check(target, None) == grpc.StatusCode.UNAVAILABLE
        assert await check(target, client(ours)) == grpc.StatusCode.OK


@sync
async def test_a_client_that_does_not_trust_the_server_is_unavailable(cert_dirs):
    ours, theirs = cert_dirs
    async with serving(tls.settings_from(tls_cfg(ours), "router")) as (target, _):
        assert await check(target, client(theirs)) == grpc.StatusCode.UNAVAILABLE


@sync
async def test_front_door_requiring_client_certificates_refuses_another_ca_and_passes_the_subject(cert_dirs):
    ours, theirs = cert_dirs
    async with serving(tls.settings_from(tls_cfg(ours, client_auth="required"), "router")) as (target, seen):
        assert await check(target, client(ours)) == grpc.StatusCode.UNAVAILABLE           # no certificate
        foreign = tls.client_settings(str(ours / "ca.pem"), str(theirs / "client-team-a.pem"),
                                      str(theirs / "client-team-a-key.pem"))             # same CN, their CA
        assert await check(target, foreign) == grpc.StatusCode.UNAVAILABLE
        assert seen.subjects == []                                                        # neither got in
        assert await check(target, client(ours, "team-a")) == grpc.StatusCode.OK
        assert seen.subjects == ["CN=team-a"]


@sync
async def test_front_door_without_client_auth_has_no_subject(cert_dirs):
    ours, _ = cert_dirs
    async with serving(tls.settings_from(tls_cfg(ours), "router")) as (target, seen):
        assert await check(target, client(ours, "team-a")) == grpc.StatusCode.OK
        assert seen.subjects == [None]


@sync
async def test_internal_servers_are_mutual_tls_with_the_internal_ca(cert_dirs):
    """kv_manager / worker / pool ports: only a service of this stack (a certificate from its CA) gets in;
    the router's own channel (rpc.channel under the router's settings) does."""
    ours, theirs = cert_dirs
    async with serving(tls.settings_from(tls_cfg(ours), "kv_manager")) as (target, seen):
        assert await check(target, client(ours)) == grpc.StatusCode.UNAVAILABLE
        foreign = tls.client_settings(str(ours / "ca.pem"), str(theirs / "router.pem"), str(theirs / "router-key.pem"))
        assert await check(target, foreign) == grpc.StatusCode.UNAVAILABLE
        assert await check(target, tls.settings_from(tls_cfg(ours), "router")) == grpc.StatusCode.OK
        assert seen.subjects == ["CN=switchyard-router"]


# ---- NATS -----------------------------------------------------------------------------------------------
@pytest.fixture
def tls_nats(cert_dirs, tmp_path):
    """A real nats-server with TLS, client certificates and a user per service (services/nats_server.py)."""
    from common.ports import free_port
    from services import nats_server
    ours, _ = cert_dirs
    port = free_port("127.0.0.1")
    child = nats_server.start("127.0.0.1", port, tmp_path, 1024 * 1024, tmp_path / "logs",
                              tls=tls.settings_from(tls_cfg(ours), "nats"))
    try:
        yield f"tls://127.0.0.1:{port}", ours
    finally:
        child.stop(5.0)


async def connect(url: str, **kw):
    import nats
    return await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5, **kw)


async def as_service(url: str, ours, role: str, name: str):
    """A NATS connection the way a service makes one (its certificate, its user's password)."""
    return await connect(url, **tls.nats_connect_options(tls.settings_from(tls_cfg(ours), role), name))


@sync
async def test_nats_refuses_a_client_without_credentials(tls_nats):
    import nats.errors
    url, ours = tls_nats
    plain = url.replace("tls://", "nats://")
    with pytest.raises((nats.errors.Error, OSError, asyncio.TimeoutError)):
        await connect(plain)                                           # no TLS at all
    ca_only = tls.client_ssl_context(tls.client_settings(str(ours / "ca.pem")))
    with pytest.raises((nats.errors.Error, OSError, asyncio.TimeoutError)):
        await connect(url, tls=ca_only)                                # TLS, but no client certificate
    cert_only = tls.client_ssl_context(tls.settings_from(tls_cfg(ours), "router"))
    with pytest.raises((nats.errors.Error, OSError, asyncio.TimeoutError)):
        await connect(url, tls=cert_only)                              # a certificate, but no user
    with pytest.raises((nats.errors.Error, OSError, asyncio.TimeoutError)):
        await connect(url, tls=cert_only, user="router", password="guess")


@sync
async def test_only_routers_publish_requests_and_only_routers_read_token_streams(tls_nats):
    url, ours = tls_nats
    batcher = await as_service(url, ours, "batcher", "batcher-w0")
    router = await as_service(url, ours, "router", "router")
    intruder = await as_service(url, ours, "kv_manager", "kv_manager")   # a service, but not a router
    try:
        requests, tokens, stolen = [], [], []

        def into(box: list):
            async def cb(msg) -> None:
                box.append(msg.data)
            return cb
        await batcher.subscribe(subjects.request("w0"), cb=into(requests))
        await router.subscribe(subjects.tokens("r1"), cb=into(tokens))
        await intruder.subscribe("sy.tok.>", cb=into(stolen))   # refused by nats-server: never delivers
        await batcher.flush()
        await router.flush()
        await intruder.publish(subjects.request("w0"), b"forged")
        await intruder.flush()
        await router.publish(subjects.request("w0"), b"real")
        await batcher.publish(subjects.tokens("r1"), b"chunk")
        await batcher.flush()
        await router.flush()
        deadline = asyncio.get_running_loop().time() + 10
        while (not requests or not tokens) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)   # the forged message would have arrived by now (same server, loopback)
        assert requests == [b"real"]
        assert tokens == [b"chunk"]
        assert stolen == []
    finally:
        for nc in (batcher, router, intruder):
            await nc.close()
