"""Bearer-token auth, TLS and server reflection."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import anyio
import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from emoe.rpc.client import EmoeClient
from emoe.rpc.server import Listen

from .conftest import connected, serving

pytestmark = pytest.mark.anyio


async def test_bearer_token_required_except_for_health():
    async with serving(listen=Listen(port=0, auth_token="s3cret")) as server:
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
