"""``emoe serve``, ``emoe worker``, ``emoe submit`` and ``emoe replay``.

grpc, torch and the engine are imported inside the handlers, so ``emoe --help`` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from emoe.core.errors import ConfigError

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9464
TOKEN_ENV = "EMOE_AUTH_TOKEN"


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="run the scheduler service over an in-process engine or remote workers",
        description="Run the gRPC scheduler service. By default it drives an in-process engine "
                    "on the reference model; --worker HOST:PORT (repeatable) drives remote "
                    "engine workers instead.")
    _listen_args(serve)
    _engine_args(serve)
    serve.add_argument("--worker", action="append", default=[], metavar="HOST:PORT",
                       help="a remote engine worker to drive (repeatable); no in-process engine")
    serve.add_argument("--worker-token-file", type=Path,
                       help="bearer token the workers expect (first line of the file)")
    serve.add_argument("--worker-ca", type=Path, help="CA certificate (PEM) to reach workers over TLS")
    serve.add_argument("--policy", type=Path, help="policy file (emoe-policy JSON) to schedule by")
    serve.add_argument("--gpu", default="a100-40gb",
                       help="hardware preset for the scheduler's memory and cost estimates")
    serve.add_argument("--profile", type=Path,
                       help="engine profile (`emoe profile`) of this model and thread count: "
                            "the scheduler's cost estimates use its measured figures, as "
                            "`emoe sim --profile` does")
    serve.add_argument("--default-task", default="conversation",
                       help="task of requests whose prompt matches no task keyword")
    serve.add_argument("--max-queue", type=int, default=1024,
                       help="waiting requests accepted before RESOURCE_EXHAUSTED")
    serve.add_argument("--default-max-tokens", type=int, default=128)
    serve.add_argument("--max-message-bytes", type=_positive_int, default=4 << 20,
                       help="largest request message accepted (default 4 MiB); larger ones "
                            "are refused with RESOURCE_EXHAUSTED before any work")
    serve.add_argument("--max-prompt-chars", type=_positive_int,
                       help="longest text prompt, checked before tokenizing (default: 16 "
                            "characters per token of the model's context)")
    serve.add_argument("--step-timeout", type=float, default=60.0,
                       help="seconds a step may take before its engine (in-process, or a "
                            "--worker) is marked down (default 60)")
    serve.add_argument("--worker-timeout", type=float, default=3.0,
                       help="with --worker: seconds a worker may leave a health check "
                            "unanswered before it is marked down (default 3)")
    serve.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                       help="Prometheus metrics port (0: no metrics endpoint); HTTPS with "
                            "--tls-cert, and only for admin tokens with --auth-token-file")
    serve.add_argument("--metrics-host", default="127.0.0.1",
                       help="address the metrics endpoint binds (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int,
                       help="also serve the OpenAI-compatible HTTP API (/v1/completions, "
                            "/v1/chat/completions, /v1/models, /health, /metrics) on this port "
                            "(0: any free port; default: off); auth, TLS and limits as the gRPC "
                            "port")
    serve.add_argument("--http-host", default="127.0.0.1",
                       help="address the HTTP API binds (default 127.0.0.1)")
    serve.set_defaults(func=_serve)

    worker = subparsers.add_parser("worker", help="serve one engine to a remote scheduler",
                                   description="Serve an engine (emoe.v1.WorkerService) for "
                                               "`emoe serve --worker HOST:PORT`.")
    _listen_args(worker, default_port=DEFAULT_PORT + 1)
    _engine_args(worker)
    worker.add_argument("--policy", type=Path,
                        help="policy file whose planner the engine serves (planner other than "
                             "'all': the engine keeps its experts in a cache); give `emoe serve` "
                             "the same file")
    worker.set_defaults(func=_worker)

    submit = subparsers.add_parser("submit", help="send one prompt and print the streamed text")
    submit.add_argument("prompt", help="prompt text")
    _target_args(submit)
    submit.add_argument("--task", default="", help="task name (default: detected by the server)")
    submit.add_argument("--max-tokens", type=int)
    submit.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    submit.add_argument("--top-p", type=float)
    submit.add_argument("--top-k", type=int)
    submit.add_argument("--seed", type=int)
    submit.add_argument("--ttft", type=float, help="time-to-first-token SLO, seconds")
    submit.add_argument("--tpot", type=float, help="time-per-output-token SLO, seconds")
    submit.add_argument("--priority", type=int, default=0, help="larger is more urgent")
    submit.add_argument("--request-id", default="")
    submit.add_argument("--timeout", type=float, help="deadline for the whole call, seconds")
    submit.add_argument("--wait-ready", type=float, default=60.0, metavar="SECONDS",
                        help="wait up to this long for the server to be ready (0: do not wait)")
    submit.set_defaults(func=_submit)

    replay = subparsers.add_parser(
        "replay", help="replay a request trace against a running service",
        description="Send a trace's requests at their recorded arrival times, prompts sized to "
                    "the trace's input tokens and outputs forced to its output tokens; write "
                    "per-request results in the simulator's columns and print the summary.")
    replay.add_argument("--trace", type=Path, required=True, help="trace file (CSV or JSONL)")
    _target_args(replay, http=True)
    replay.add_argument("--model", help="HTTP target: the model to request (default: the first "
                                        "its /v1/models lists)")
    replay.add_argument("--force-length", choices=("auto", "ignore_eos", "min_tokens", "none"),
                        default="auto",
                        help="HTTP target: how to make the server generate the trace's output "
                             "lengths (auto: the first of ignore_eos, min_tokens that the server "
                             "accepts; none: actual lengths are reported)")
    replay.add_argument("--rate-scale", type=float, default=1.0,
                        help="multiply the arrival rate (2 = twice as fast)")
    replay.add_argument("--limit", type=int, help="replay at most this many requests")
    replay.add_argument("--seed", type=int, default=0, help="seed for the synthetic prompts")
    replay.add_argument("--prompts", choices=("random", "tasks"), default="random",
                        help="random token ids (default), or text of each request's task sent "
                             "greedily (gRPC): the prompts whose routing `emoe record-routing "
                             "--trace` records for `emoe sim --routing-trace`")
    replay.add_argument("--tokenizer", type=Path, default=None, metavar="CHECKPOINT",
                        help="--prompts tasks: the served model's folder (its tokenizer, bos "
                             "and eos; default: the reference model)")
    replay.add_argument("--out", type=Path, help="per-request results (CSV)")
    replay.add_argument("--wait-ready", type=float, default=60.0, metavar="SECONDS",
                        help="wait up to this long for the server to be ready (0: do not wait)")
    replay.add_argument("--fit", choices=("reject", "skip", "scale"), default="reject",
                        help="requests whose prompt + output exceed the model's context: sent "
                             "as recorded (the server refuses them), skipped, or scaled down to "
                             "fit; `emoe sim --fit` applies the same rule")
    replay.set_defaults(func=_replay)


def _listen_args(p: argparse.ArgumentParser, default_port: int = DEFAULT_PORT) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=default_port)
    p.add_argument("--auth-token-file", type=Path,
                   help="require a bearer token listed in this file: one per line, 'TOKEN' "
                        "or 'NAME TOKEN [admin]' (docs/rpc.md); or one token in "
                        f"${TOKEN_ENV}")
    p.add_argument("--tls-cert", type=Path, help="server certificate (PEM); needs --tls-key")
    p.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    p.add_argument("--drain-grace", type=float, default=30.0,
                   help="seconds streams in flight get to finish after SIGTERM")
    p.add_argument("--log-level", default="INFO")


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path,
                   help="Hugging Face model folder (default: the reference model emoe-tiny)")
    p.add_argument("--backend", choices=("engine", "fake"), default="engine",
                   help="'fake' does no model work (for tests and benchmarks)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", help="compute dtype (default: as stored; half precision runs as float32 on CPU)")
    p.add_argument("--max-batch-size", type=int, default=16, help="KV cache slots")
    p.add_argument("--max-seq-len", type=int, help="context length (default: the model's)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads of the engine (default: torch's choice, one per core)")
    p.add_argument("--fake-step-delay", type=float, default=0.0,
                   help="seconds per step of the fake backend")
    p.add_argument("--engine-timeout", type=float, default=10.0,
                   help="seconds a step may go without entering a model layer before the "
                        "engine counts as hung (default 10): its requests end UNAVAILABLE and "
                        "it serves again once the step returns")
    p.add_argument("--expert-budget", metavar="BUDGET",
                   help="expert cache size when the policy's planner is not 'all': experts "
                        "per layer (5/layer), a fraction of all experts (62.5%%, 0.625) or a "
                        "size (64MiB); default: the policy's experts_per_layer / "
                        "expert_budget_bytes")
    p.add_argument("--miss", choices=("reroute", "fetch", "drop"),
                   help="what a token whose expert is not resident does (default: fetch for "
                        "the lru planner, reroute otherwise)")


def _target_args(p: argparse.ArgumentParser, http: bool = False) -> None:
    p.add_argument("--target", default=f"127.0.0.1:{DEFAULT_PORT}",
                   help="HOST:PORT of `emoe serve`" + (
                       ", or http(s)://HOST:PORT/v1 of any OpenAI-compatible server (emoe serve "
                       "--http-port, vLLM, SGLang, ...)" if http else ""))
    p.add_argument("--auth-token-file", type=Path,
                   help=f"bearer token to send (the file's first token; or ${TOKEN_ENV})")
    p.add_argument("--tls-ca", type=Path, help="CA certificate (PEM): connect over TLS")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _token(path: Path | None) -> str | None:
    """The bearer token a client sends."""
    from emoe.rpc.auth import client_token

    if path is not None:
        return client_token(path)
    return os.environ.get(TOKEN_ENV) or None


def _tokens(path: Path | None):
    """The tokens a server accepts (None: auth off)."""
    from emoe.rpc.auth import TokenTable

    if path is not None:
        return TokenTable.from_file(path)
    token = os.environ.get(TOKEN_ENV)
    return TokenTable.single(token) if token else None


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def _listen(args: argparse.Namespace):
    from emoe.rpc.server import Listen

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    return Listen(host=args.host, port=args.port, auth=_tokens(args.auth_token_file),
                  tls_cert=args.tls_cert, tls_key=args.tls_key,
                  max_message_bytes=getattr(args, "max_message_bytes", None))


def _offload(args: argparse.Namespace, policy):
    """The engine's expert cache for ``policy`` (None: planner 'all', every expert resident)."""
    from emoe.rpc.offload import OffloadConfig, miss_policy, parse_budget

    if policy.planner == "all":
        for flag, value in (("--expert-budget", args.expert_budget), ("--miss", args.miss)):
            if value is not None:
                raise ConfigError(f"{flag}: the policy's planner is 'all' (every expert resident); "
                                  "give a --policy file with another planner")
        return None
    miss_policy(policy.planner, args.miss)  # fail before the model loads
    return OffloadConfig(policy, parse_budget(args.expert_budget), args.miss)


def _local_backend(args: argparse.Namespace, policy=None):
    if args.backend == "fake":
        from emoe.rpc.fake import FakeBackend

        return FakeBackend(step_delay_s=args.fake_step_delay, max_running=args.max_batch_size)
    from emoe.core.policy_file import PolicyConfig
    from emoe.rpc.local import DEFAULT_STEP_TIMEOUT_S, REFERENCE_CHECKPOINT, LocalEngineBackend

    from emoe.core.paths import resolve_path

    checkpoint = Path(resolve_path(args.checkpoint)) if args.checkpoint else REFERENCE_CHECKPOINT
    if not (checkpoint / "config.json").is_file():
        hint = ("the reference model is not built yet: train it (emoe model train-tiny) or "
                if args.checkpoint is None else "")
        raise ConfigError(f"--checkpoint: {checkpoint} has no config.json; {hint}"
                          "name a Hugging Face model folder")
    policy = policy if policy is not None else PolicyConfig()
    from emoe.core.model_config import model_spec_from

    policy.check_model(model_spec_from(checkpoint))  # before the model loads
    offload = _offload(args, policy)
    step_timeout = getattr(args, "step_timeout", None)  # a worker's: its scheduler's flag
    return LocalEngineBackend(checkpoint, device=args.device, dtype=args.dtype,
                              max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                              offload=offload, threads=args.threads,
                              step_timeout_s=step_timeout or DEFAULT_STEP_TIMEOUT_S,
                              stall_timeout_s=args.engine_timeout)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _serve(args: argparse.Namespace) -> int:
    from emoe.core.policy_file import PolicyConfig
    from emoe.core.specs import get_hardware
    from emoe.rpc.remote import RemoteBackend
    from emoe.rpc.server import SchedulerServer, run_until_signal

    _setup_logging(args.log_level)
    policy = PolicyConfig.from_file(args.policy) if args.policy else PolicyConfig()
    if args.worker:
        for flag, value in (("--expert-budget", args.expert_budget), ("--miss", args.miss)):
            if value is not None:
                raise ConfigError(f"{flag}: with --worker the workers hold the experts; give it "
                                  "(and the same --policy) to `emoe worker`")
        token, ca = _token(args.worker_token_file), _read(args.worker_ca)
        backends = [RemoteBackend(target, auth_token=token, root_certificates=ca,
                                  step_timeout_s=args.step_timeout,
                                  liveness_timeout_s=args.worker_timeout)
                    for target in args.worker]
    else:
        backends = [_local_backend(args, policy)]
    hardware = get_hardware(args.gpu)
    if args.profile is not None:
        profile, model = _profiled(args)
        hardware = profile.apply(hardware, model)[0]
        backend = backends[0]
        if profile.step_table is not None and hasattr(backend, "speed"):
            from emoe.rpc.engine_speed import EngineSpeed

            backend.speed = EngineSpeed(
                profile.step_table, profile.offload if policy.serves_with_expert_cache else None,
                profile.serving)
    server = SchedulerServer(
        backends, policy, hardware, _listen(args), default_task=args.default_task,
        max_queue=args.max_queue, default_max_tokens=args.default_max_tokens,
        max_prompt_chars=args.max_prompt_chars, metrics_port=args.metrics_port or None,
        metrics_host=args.metrics_host, remote_workers=tuple(args.worker),
        http_port=args.http_port, http_host=args.http_host,
        policy_source=f"policy file {args.policy}" if args.policy else "built-in defaults")
    return asyncio.run(run_until_signal(server, args.drain_grace))


def _checkpoint(args: argparse.Namespace) -> Path:
    from emoe.rpc.local import REFERENCE_CHECKPOINT

    return args.checkpoint or REFERENCE_CHECKPOINT


def _profiled(args: argparse.Namespace):
    """The profile and the in-process engine's model spec, once the profile is known to be of
    that model and thread count."""
    import torch

    from emoe.core.model_config import model_spec_from
    from emoe.core.profile import load_profile

    if args.worker:
        raise ConfigError("--profile: checked against the in-process engine's model and threads; "
                          "with --worker the workers' engines are not known here")
    profile = load_profile(args.profile)
    model = model_spec_from(_checkpoint(args))
    profile.check_model(model)
    profile.check_threads(args.threads or torch.get_num_threads(), "this server's engine")
    return profile, model


def _worker(args: argparse.Namespace) -> int:
    from emoe.rpc.server import WorkerServer, run_until_signal

    from emoe.core.policy_file import PolicyConfig

    _setup_logging(args.log_level)
    policy = PolicyConfig.from_file(args.policy) if args.policy else PolicyConfig()
    return asyncio.run(run_until_signal(WorkerServer(_local_backend(args, policy), _listen(args)),
                                        args.drain_grace))


def _client(args: argparse.Namespace):
    from emoe.rpc.client import EmoeClient

    return EmoeClient(args.target, auth_token=_token(args.auth_token_file),
                      root_certificates=_read(args.tls_ca))


async def _wait_ready(client, seconds: float) -> None:
    """Waits for the server's health to say SERVING; a clear error after ``seconds``."""
    if seconds <= 0:
        return
    try:
        await client.wait_serving(timeout=seconds)
    except TimeoutError as exc:
        raise ConfigError(f"--target {client.target}: not ready within {seconds:g} s "
                          f"(--wait-ready); last answer: {exc}") from None


async def _replay_target(args: argparse.Namespace):
    """emoe's gRPC service, or an OpenAI-compatible HTTP server for an http(s):// target;
    ready (``--wait-ready``)."""
    if args.target.startswith(("http://", "https://")):
        from emoe.rpc.http.replay import HttpTarget

        target = HttpTarget(args.target, auth_token=_token(args.auth_token_file),
                            ca_file=str(args.tls_ca) if args.tls_ca else None, model=args.model,
                            force_length=args.force_length)
        await target.wait_ready(args.wait_ready)
        return target
    from emoe.rpc.replay import GrpcTarget

    if args.model is not None:
        raise ConfigError("--model: only for an http(s):// target")
    if args.force_length != "auto":
        raise ConfigError("--force-length: only for an http(s):// target (gRPC replay always "
                          "forces output lengths with ignore_eos)")
    client = _client(args)
    await _wait_ready(client, args.wait_ready)
    return GrpcTarget(client, temperature=0.0 if args.prompts == "tasks" else None)


def _submit(args: argparse.Namespace) -> int:
    import grpc

    from emoe.rpc.client import generate_request
    from emoe.rpc.v1 import scheduler_pb2 as pb

    request = generate_request(
        args.prompt, request_id=args.request_id, task=args.task, ttft_s=args.ttft,
        tpot_s=args.tpot, max_tokens=args.max_tokens, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, seed=args.seed, priority=args.priority)

    async def run() -> int:
        async with _client(args) as client:
            try:
                await _wait_ready(client, args.wait_ready)
                async for response in client.stream(request, timeout=args.timeout):
                    sys.stdout.write(response.text)
                    sys.stdout.flush()
                    if response.HasField("completion"):
                        c = response.completion
                        print(f"\n[{response.request_id}] task={c.task} "
                              f"finish={pb.FinishReason.Name(c.finish_reason)} "
                              f"prompt_tokens={c.prompt_tokens} output_tokens={c.output_tokens} "
                              f"ttft={c.timings.ttft_s:.3f}s total={c.timings.total_s:.3f}s "
                              f"slo_met={c.slo_met}", file=sys.stderr)
            except grpc.aio.AioRpcError as exc:
                print(f"\nemoe submit: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
        return 0

    return asyncio.run(run())


def _replay(args: argparse.Namespace) -> int:
    from emoe.rpc.replay import check_trace, replay_file

    if args.rate_scale <= 0:
        raise ConfigError(f"--rate-scale: must be > 0, got {args.rate_scale}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit: must be >= 1, got {args.limit}")
    check_trace(args.trace, rate_scale=args.rate_scale, limit=args.limit, seed=args.seed)
    prompts = None
    if args.prompts == "tasks":
        from emoe.engine.reference.prompts import TaskPrompts
        from emoe.rpc.local import REFERENCE_CHECKPOINT

        if args.target.startswith(("http://", "https://")):
            raise ConfigError("--prompts tasks: gRPC targets only (they are sent greedily)")
        prompts = TaskPrompts.for_checkpoint(args.tokenizer or REFERENCE_CHECKPOINT, args.seed)

    async def run() -> int:  # the client's channel belongs to this event loop
        return await replay_file(args.trace, await _replay_target(args), rate_scale=args.rate_scale,
                                 limit=args.limit, seed=args.seed, out=args.out, fit=args.fit,
                                 prompts=prompts)

    return asyncio.run(run())
