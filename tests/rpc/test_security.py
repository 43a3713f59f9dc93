"""Bearer-token auth, TLS and server reflection."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import anyio
import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from emoe.core.errors import ConfigError
from emoe.rpc.auth import Identity, TokenTable, client_token
from emoe.rpc.client import EmoeClient, generate_request
from emoe.rpc.fake import FakeBackend
from emoe.rpc.server import Listen
from emoe.rpc.v1 import scheduler_pb2 as pb

from .conftest import connected, serving
from .test_service import rest_of

pytestmark = pytest.mark.anyio


async def test_bearer_token_required_except_for_health():
    async with serving(listen=Listen(port=0, auth=TokenTable.single("s3cret"))) as server:
        async with connected(server) as anonymous:
            assert await anonymous.health() == health_pb2.HealthCheckResponse.SERVING
            for call in (lambda: anonymous.server_info(),
                         lambda: anonymous.complete([3], max_tokens=1)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with connected(server, auth_token="wrong") as wrong:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await wrong.complete([3], max_tokens=1)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with connected(server, auth_token="s3cret") as client:
            result = await client.complete([3], max_tokens=2)
    assert result.completion.output_tokens == 2


def self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
async def test_tls_serves_clients_that_trust_the_certificate(tmp_path):
    cert, key = self_signed(tmp_path)
    async with serving(listen=Listen(port=0, tls_cert=cert, tls_key=key)) as server:
        target = f"localhost:{server.port}"
        async with EmoeClient(target, root_certificates=cert.read_bytes()) as client:
            result = await client.complete([3], max_tokens=2)
        async with EmoeClient(target) as plaintext:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await plaintext.server_info(timeout=2)
    assert result.completion.output_tokens == 2
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_reflection_lists_and_describes_the_services():
    async with serving() as server:
        def reflect() -> tuple[list[str], list[str]]:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                db = ProtoReflectionDescriptorDatabase(channel)
                pool = descriptor_pool.DescriptorPool(db)
                service = pool.FindServiceByName("emoe.v1.SchedulerService")
                return db.get_services(), [m.name for m in service.methods]

        services, methods = await anyio.to_thread.run_sync(reflect)
    assert "emoe.v1.SchedulerService" in services and "grpc.health.v1.Health" in services
    assert methods == ["Generate", "Abort", "GetServerInfo", "GetStats"]


TOKENS = """# identities of this server
alice  tok-alice
bob    tok-bob
ops    tok-ops   admin
"""


def test_token_file_names_identities_and_errors_name_the_line(tmp_path):
    table = TokenTable.parse(TOKENS, "tokens.txt")
    assert table.identify("Bearer tok-alice") == Identity("alice")
    assert table.identify(b"Bearer tok-ops") == Identity("ops", admin=True)
    assert table.identify("Bearer tok-nobody") is None and table.identify(None) is None
    assert TokenTable.parse("lone-token\n", "t").identify("Bearer lone-token") == \
        Identity("default", admin=True)
    for text, problem in (("a b c d\n", "tokens.txt:1: expected 'TOKEN' or 'NAME TOKEN"),
                          ("x/y tok\n", "tokens.txt:1: identity name"),
                          ("a t\nb t\n", "tokens.txt:2: this token is already listed"),
                          ("# nothing\n", "tokens.txt: the token file lists no token")):
        with pytest.raises(ConfigError, match=problem):
            TokenTable.parse(text, "tokens.txt")
    path = tmp_path / "tokens.txt"
    path.write_text(TOKENS)
    assert client_token(path) == "tok-alice"


async def test_requests_belong_to_their_identity():
    listen = Listen(port=0, auth=TokenTable.parse(TOKENS, "tokens"))
    async with serving([FakeBackend(step_delay_s=0.01)], listen=listen) as server, \
            connected(server, auth_token="tok-alice") as alice, \
            connected(server, auth_token="tok-bob") as bob, \
            connected(server, auth_token="tok-ops") as ops:
        mine = alice.stream(generate_request([3], request_id="job", max_tokens=1000))
        same_id = bob.stream(generate_request([4], request_id="job", max_tokens=1000))
        assert (await mine.read()).request_id == "job"
        assert (await same_id.read()).request_id == "job"  # ids are per identity
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await bob.abort("nonexistent")
        await bob.abort("job")  # bob's own
        bob_rest = await rest_of(same_id)
        alice_stats, bob_stats, ops_stats = (await alice.stats(), await bob.stats(),
                                             await ops.stats())
        await ops.abort("job")  # an admin aborts anyone's
        alice_rest = await rest_of(mine)
        await bob.complete([5], max_tokens=2)
        bob_after = await bob.stats()
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert bob_rest[-1].completion.finish_reason == pb.FINISH_REASON_ABORTED
    assert alice_rest[-1].completion.finish_reason == pb.FINISH_REASON_ABORTED
    assert (alice_stats.running + alice_stats.waiting, bob_stats.running + bob_stats.waiting,
            ops_stats.running + ops_stats.waiting) == (1, 0, 1)
    assert [sum(t.submitted for t in s.tasks) for s in (alice_stats, bob_stats, ops_stats)] == [1, 1, 2]
    assert sum(t.aborted for t in bob_stats.tasks) == 1
    assert sum(t.finished for t in bob_after.tasks) == 1 and sum(t.aborted for t in bob_after.tasks) == 1


async def test_abort_of_another_identitys_request_is_refused_and_it_runs_on():
    listen = Listen(port=0, auth=TokenTable.parse(TOKENS, "tokens"))
    async with serving([FakeBackend(step_delay_s=0.005)], listen=listen) as server, \
            connected(server, auth_token="tok-alice") as alice, \
            connected(server, auth_token="tok-bob") as bob:
        call = alice.stream(generate_request([3], request_id="alices", max_tokens=40))
        await call.read()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await bob.abort("alices")
        rest = await rest_of(call)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "no request 'alices' of yours in flight"
    assert rest[-1].completion.finish_reason == pb.FINISH_REASON_LENGTH


def _scrape(url: str, token: str | None = None, context=None) -> int:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            assert b"emoe_requests_waiting" in response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_metrics_port_binds_localhost_and_refuses_scrapes_without_an_admin_token():
    listen = Listen(port=0, auth=TokenTable.parse(TOKENS, "tokens"))
    async with serving(listen=listen, metrics_port=0) as server:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        codes = [await anyio.to_thread.run_sync(_scrape, url, token)
                 for token in (None, "wrong", "tok-alice", "tok-ops")]
        bound = server._metrics_http._httpd.server_address[0]
    assert codes == [401, 401, 403, 200]
    assert bound == "127.0.0.1"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
async def test_metrics_port_serves_https_with_the_servers_certificate(tmp_path):
    cert, key = self_signed(tmp_path)
    async with serving(listen=Listen(port=0, tls_cert=cert, tls_key=key), metrics_port=0) as server:
        context = ssl.create_default_context(cafile=str(cert))
        https = await anyio.to_thread.run_sync(
            _scrape, f"https://localhost:{server.metrics_port}/metrics", None, context)
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            await anyio.to_thread.run_sync(_scrape, f"http://127.0.0.1:{server.metrics_port}/metrics")
    assert https == 200
