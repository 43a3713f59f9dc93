"""The gRPC servers: the scheduler service (``emoe serve``) and an engine worker (``emoe worker``).

Both are grpc.aio servers with the standard health service (NOT_SERVING until the engine is
warm, while no engine can serve, and while draining), server reflection, optional bearer-token
auth and TLS, and the error interceptor. SIGTERM (or SIGINT) drains: health goes NOT_SERVING,
new requests are refused with UNAVAILABLE, and streams in flight get ``grace_s`` to finish.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from emoe.core.errors import ConfigError, EmoeError
from emoe.core.policy_file import PolicyConfig
from emoe.core.specs import HardwareSpec
from emoe.rpc.auth import BearerTokenInterceptor, TokenTable
from emoe.rpc.backend import Backend, BackendInfo
from emoe.rpc.errors import ErrorInterceptor
from emoe.rpc.intake import Intake
from emoe.rpc.memory import MemoryKeeper
from emoe.rpc.metrics import ServiceMetrics
from emoe.rpc.metrics_http import MetricsServer
from emoe.rpc.policy_info import policy_in_force
from emoe.rpc.replica import Replica, Scheduler, SchedulerFactory
from emoe.rpc.service import DEFAULT_MAX_MESSAGE_BYTES, SchedulerService, ServiceConfig
from emoe.rpc.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from emoe.rpc.worker import WorkerService

log = logging.getLogger(__name__)

SCHEDULER_SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name
WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
HEALTH_POLL_S = 0.05
WORKER_MAX_MESSAGE_BYTES = 64 << 20  # a step carries up to a batch of whole prompts
TRANSPORT_LIMIT = 64 << 20
SERVER_OPTIONS = (
    ("grpc.so_reuseport", 0),  # a second server on a taken port fails instead of sharing it
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.max_send_message_length", 64 << 20),
    # A stream's receive window stays at 64 KiB until its handler reads the message; BDP
    # probing would widen every window to megabytes, so that a flood of calls waiting for a
    # receive slot would hold megabytes each (emoe.rpc.intake).
    ("grpc.http2.bdp_probe", 0),
    # Each connection holds buffers (~0.1 MiB measured); past this many, new ones are closed.
    ("grpc.max_allowed_incoming_connections", 1024),
)


@dataclass(frozen=True, slots=True)
class Listen:
    """Where and how a server listens. TLS when both ``tls_cert`` and ``tls_key`` are given;
    bearer-token auth when ``auth`` is. ``max_message_bytes``: the largest request message
    (None: 4 MiB for the scheduler service, 64 MiB for a worker); a larger one is refused by
    gRPC with RESOURCE_EXHAUSTED before it reaches the service."""

    host: str = "127.0.0.1"
    port: int = 50051
    auth: TokenTable | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_message_bytes: int | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server-side TLS context for HTTP (None without TLS)."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        _tls_pair(self.tls_cert, self.tls_key)  # one clear line if they do not load
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls_cert, self.tls_key)
        return context


def _tls_pair(cert: Path, key: Path) -> tuple[bytes, bytes]:
    """The certificate and key files, checked to load as a pair (gRPC would only log why not)."""
    data = []
    for path, flag in ((key, "--tls-key"), (cert, "--tls-cert")):
        try:
            data.append(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror}") from None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        raise ConfigError(f"--tls-cert/--tls-key: {cert} and {key} are not a PEM certificate "
                          f"and its private key: {exc.reason or exc}") from None
    return data[0], data[1]


def _check_free(host: str, port: int) -> None:
    """Fails with one clear line if ``host:port`` cannot be bound (gRPC would log a few)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host: cannot resolve {host!r}: {exc.strerror}") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise ConfigError(f"--port: cannot listen on {host}:{port}: "
                                  f"{exc.strerror}") from None


def build_server(listen: Listen, services: tuple[str, ...], max_message_bytes: int,
                 intake: Intake | None = None
                 ) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    """A grpc.aio server with auth, error mapping, health (NOT_SERVING) and reflection, bound
    to ``listen``, reading request messages through ``intake``'s receive slots; returns it,
    the bound port and its health servicer. Errors that stop it from listening (unreadable
    certificates, a port in use) are ConfigErrors."""
    limit = listen.max_message_bytes or max_message_bytes
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if listen.auth is not None:
        interceptors.append(BearerTokenInterceptor(listen.auth))
    interceptors.append(ErrorInterceptor(limit, intake))
    # gRPC's own refusal of an oversized message comes 100-300 ms after the message arrived
    # (measured, grpcio 1.85); up to TRANSPORT_LIMIT the message is read and the interceptor
    # refuses it at once. Beyond, gRPC discards it as it arrives.
    options = (*SERVER_OPTIONS, ("grpc.max_receive_message_length",
                                 max(limit, min(5 * limit, TRANSPORT_LIMIT))))
    server = grpc.aio.server(interceptors=interceptors, options=options)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((*services, reflection.SERVICE_NAME,
                                         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name),
                                        server)
    address = f"{listen.host}:{listen.port}"
    if listen.port:
        _check_free(listen.host, listen.port)
    try:
        if listen.tls_cert is not None and listen.tls_key is not None:
            credentials = grpc.ssl_server_credentials([_tls_pair(listen.tls_cert, listen.tls_key)])
            port = server.add_secure_port(address, credentials)
        elif listen.tls_cert is not None or listen.tls_key is not None:
            raise ConfigError("--tls-cert and --tls-key go together")
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
        raise ConfigError(f"--port: cannot listen on {address} (in use, or not an address of "
                          f"this machine): {exc}") from None
    if port == 0 and listen.port != 0:
        raise ConfigError(f"--port: cannot listen on {address} (in use, or not an address of "
                          "this machine)")
    return server, port, health


async def _set_health(health: health_aio.HealthServicer, services: tuple[str, ...],
                      serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", *services):
        await health.set(name, status)


def scheduler_factory(policy: PolicyConfig, hardware: HardwareSpec) -> SchedulerFactory:
    """Builds the core scheduler for an engine, capping the running batch at its KV slots;
    over an offloading engine (``info.expert_slots``) its expert and memory budgets are the
    engine's (``emoe.core.serving.serving_scheduler_policy``, shared with the simulator)."""

    def make(info: BackendInfo) -> Scheduler:
        from emoe.core.scheduler import Scheduler as CoreScheduler
        from emoe.core.serving import EngineLimits, serving_scheduler_policy

        limits = EngineLimits(info.max_running, info.max_context, info.expert_slots)
        config, fixed = serving_scheduler_policy(policy, info.model, limits)
        return CoreScheduler(info.model, hardware, config, fixed_expert_slots=fixed)

    return make


class SchedulerServer:
    """The scheduler service over one or more engine backends (one replica each); with
    ``http_port`` also the OpenAI-compatible HTTP front door (``emoe.rpc.http``) on
    ``http_host`` (auth, TLS and limits as ``listen``), in the same event loop."""

    def __init__(self, backends: list[Backend], policy: PolicyConfig, hardware: HardwareSpec,
                 listen: Listen = Listen(), *, default_task: str = "conversation",
                 max_queue: int = 1024, default_max_tokens: int = 128,
                 max_prompt_chars: int | None = None, metrics_port: int | None = None,
                 metrics_host: str = "127.0.0.1", remote_workers: tuple[str, ...] = (),
                 http_port: int | None = None, http_host: str = "127.0.0.1",
                 policy_source: str = "built-in defaults"):
        self.listen = listen
        self._http_listen = (http_host, http_port)
        self.http = None
        self.http_port = 0
        replicas: list[Replica] = []
        self.metrics = ServiceMetrics(list(policy.tasks), load=lambda: self.service.load())
        make_scheduler = scheduler_factory(policy, hardware)
        for backend in backends:
            replicas.append(Replica(backend, self._reporting(make_scheduler, backend, policy_source),
                                    self.metrics))
        if default_task not in policy.tasks:
            default_task = next(iter(policy.tasks))
        config = ServiceConfig(tasks=dict(policy.tasks), default_task=default_task,
                               policy=policy.scheduling, max_queue=max_queue,
                               default_max_tokens=default_max_tokens,
                               max_message_bytes=listen.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES,
                               max_prompt_chars=max_prompt_chars, auth=listen.auth)
        self.service = SchedulerService(config, replicas, self.metrics, list(remote_workers))
        self.intake = Intake()  # the receive slots of both front doors
        self._metrics_port = metrics_port
        self._metrics_host = metrics_host
        self._metrics_http: MetricsServer | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health_aio.HealthServicer | None = None
        self._watch: asyncio.Task | None = None
        self._memory: asyncio.Task | None = None
        self._serving = False
        self.port = 0
        self.metrics_port = 0
        self.failed: BaseException | None = None
        self.stopped = asyncio.Event()

    def _reporting(self, make: SchedulerFactory, backend: Backend, source: str) -> SchedulerFactory:
        """``make``, reporting the policy in force of each scheduler it builds (log line,
        GetServerInfo, metrics)."""

        def build(info: BackendInfo) -> Scheduler:
            scheduler = make(info)
            experts = getattr(backend, "experts", None)  # an in-process expert cache
            miss = experts.miss.value if experts is not None else None
            if miss is None and info.expert_slots and scheduler.planner.name != "all":
                miss = f"the worker's ({scheduler.planner.miss_mode.value} unless it has --miss)"
            in_force = policy_in_force(scheduler, miss, source)
            log.info("%s", in_force.log_line())
            self.service.policy_in_force = in_force
            self.metrics.policy(in_force)
            return scheduler

        return build

    async def start(self) -> None:
        services = (SCHEDULER_SERVICE,)
        self._server, self.port, self._health = build_server(
            self.listen, services, self.service.config.max_message_bytes, self.intake)
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(self.service, self._server)
        await _set_health(self._health, services, False)
        if self._metrics_port is not None:
            listen = self.listen
            self._metrics_http = MetricsServer(self.metrics.registry, self._metrics_host,
                                               self._metrics_port, listen.auth, listen.tls_cert,
                                               listen.tls_key)
            self.metrics_port = self._metrics_http.port
        await self._server.start()
        host, port = self._http_listen
        if port is not None:
            from emoe.rpc.http.server import HttpFrontDoor

            try:
                self.http = HttpFrontDoor(self.service, self.metrics.registry, host, port,
                                          ssl_context=self.listen.ssl_context(),
                                          intake=self.intake)
                await self.http.start()
            except BaseException:
                await self._server.stop(None)
                raise
            self.http_port = self.http.port
        for replica in self.service.replicas:
            await replica.start()
        self._watch = asyncio.create_task(self._watch_health(), name="health-watch")

    async def wait_serving(self) -> None:
        while not self._serving:
            if self.failed is not None:
                raise self.failed
            await asyncio.sleep(0.01)

    async def _watch_health(self) -> None:
        """Keeps health in step with the replicas: SERVING while any engine takes requests;
        logs why whenever it changes."""
        reason = "starting"
        while True:
            for replica in self.service.replicas:
                if replica.failure is not None:
                    self._fail(replica.failure)
                    return
            serving, why = self.service.health()
            if serving and not self.service.model_known:
                try:
                    self.service.model_ready()
                except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer that cannot load
                    self._fail(ConfigError(f"the engine's tokenizer cannot be loaded: {exc}"))
                    return
                # from the warm engine's size on: see emoe.rpc.memory
                self._memory = asyncio.create_task(MemoryKeeper().run(), name="memory-keeper")
            if serving != self._serving:
                self._serving = serving
                await _set_health(self._health, (SCHEDULER_SERVICE,), serving)
            if why != reason:
                reason = why
                if serving:
                    log.info("health: SERVING")
                else:
                    log.warning("health: NOT_SERVING: %s", why)
            await asyncio.sleep(HEALTH_POLL_S)

    def _fail(self, error: BaseException) -> None:
        """Stops serving for good: ``run_until_signal`` (or ``wait_serving``) raises ``error``."""
        self.failed = error
        self.stopped.set()

    async def drain(self, grace_s: float) -> None:
        """NOT_SERVING, refuse new requests, let streams in flight finish, then stop."""
        self.service.start_draining()
        if self._watch is not None:
            self._watch.cancel()
        await self._health.enter_graceful_shutdown()
        if not await self.service.wait_drained(grace_s):
            log.warning("drain: %d requests still in flight after %.1f s; ending them",
                        self.service.in_flight, grace_s)
        await self.stop()

    async def stop(self) -> None:
        for task in (self._watch, self._memory):
            if task is not None:
                task.cancel()
        for replica in self.service.replicas:
            await replica.close()
        if self.http is not None:
            await self.http.stop()
        if self._server is not None:
            await self._server.stop(grace=1.0)
        if self._metrics_http is not None:
            self._metrics_http.close()
            self._metrics_http = None
        self.service.close()
        self.stopped.set()


class WorkerServer:
    """One engine served to a remote scheduler."""

    def __init__(self, backend: Backend, listen: Listen = Listen()):
        self.backend = backend
        self.listen = listen
        self._server: grpc.aio.Server | None = None
        self._health: health_aio.HealthServicer | None = None
        self._service: WorkerService | None = None
        self.port = 0
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        services = (WORKER_SERVICE,)
        self._server, self.port, self._health = build_server(self.listen, services,
                                                             WORKER_MAX_MESSAGE_BYTES)
        info = await self.backend.start()
        self._service = WorkerService(self.backend, info)
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self._service, self._server)
        await self._server.start()
        await _set_health(self._health, services, True)

    async def drain(self, grace_s: float) -> None:
        """NOT_SERVING (the scheduler sends no new requests), keep running steps until the
        requests held have finished or ``grace_s`` has passed, then stop."""
        await self._health.enter_graceful_shutdown()
        if self._service is not None:
            try:
                await asyncio.wait_for(self._service.idle.wait(), grace_s)
            except TimeoutError:
                log.warning("drain: requests still held after %.1f s; stopping", grace_s)
        await self._server.stop(grace=min(grace_s, 1.0))
        await self.backend.close()
        self.stopped.set()

    async def stop(self) -> None:
        await self.drain(0.0)


async def _freeze_heap(server: SchedulerServer | WorkerServer) -> None:
    """Once the engine is up, what the process holds (its modules, the model: ~270k objects
    with torch loaded) moves out of the garbage collector's sight: a full collection that
    scans it stalls the serving loop (130 ms on the dev VM). Refcounting still frees what it
    drops."""
    if isinstance(server, SchedulerServer):
        try:
            await server.wait_serving()
        except Exception:  # noqa: BLE001 - the engine failed: run_until_signal reports it
            return
    gc.collect()
    gc.freeze()
    log.info("engine up: %d objects moved out of the garbage collector's scans",
             gc.get_freeze_count())


async def run_until_signal(server: SchedulerServer | WorkerServer, grace_s: float) -> int:
    """Starts ``server`` and runs it until SIGTERM/SIGINT (then drains) or a startup failure."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    log.info("listening on %s:%d", server.listen.host, server.port)
    freeze = asyncio.create_task(_freeze_heap(server))
    stop_wait = asyncio.create_task(stop.wait())
    stopped_wait = asyncio.create_task(server.stopped.wait())
    await asyncio.wait((stop_wait, stopped_wait), return_when=asyncio.FIRST_COMPLETED)
    stop_wait.cancel()
    stopped_wait.cancel()
    freeze.cancel()
    if isinstance(server, SchedulerServer) and server.failed is not None:
        await server.stop()
        failed = server.failed
        if isinstance(failed, EmoeError):
            raise failed
        raise EmoeError(f"the engine cannot start: {type(failed).__name__}: {failed}") from None
    log.info("draining (grace %.1f s)", grace_s)
    await server.drain(grace_s)
    return 0
