"""`comfyui-gateway`: run the gateway (all in one, or the API and the worker apart), migrate its database,
check health, or run the ComfyUI simulator; and, for people, run and watch jobs and manage templates through a
running gateway's API (app.cli_user).

This module is the composition root: it alone imports `api` and `worker`, inside the commands that
start them, so the rest of `app` stays free of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from contextlib import AsyncExitStack, contextmanager
from importlib.metadata import version
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

if TYPE_CHECKING:
    from app.settings import Settings
    from app.child_processes import RestartingPart
    from app.devserver import TemporalDevServer

log = logging.getLogger("comfyui_gateway")

# The commands whose process starts the Temporal SDK's core, whose threads can crash the interpreter's
# teardown (app.interpreter_exit): they end without one.
_RUN_THE_TEMPORAL_SDK = frozenset({"dev", "api", "worker", "health"})


def _load_settings() -> Settings:
    # Imported here, not above: it loads Temporal's SDK, which the commands for people never need.
    from app.settings import Settings

    try:
        return Settings()
    except ValidationError as error:
        problems = "\n".join(f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors())
        sys.exit(f"comfyui-gateway: invalid configuration\n{problems}")


async def _connect(settings: Settings, *, for_worker: bool):  # type: ignore[no-untyped-def]
    from app.temporal_client import connect_within, process_runtime

    runtime = process_runtime(settings, serves_metrics=for_worker)  # once: it binds TEMPORAL_METRICS_ADDRESS
    return await connect_within(settings, runtime)


def _api_socket(settings: Settings) -> socket.socket:
    """The API's address, listened on before the wait for Temporal, which may take a minute: a port in use is
    a configuration error, said at once (exit 78, EX_CONFIG, which `dev` does not restart), and the port is the
    API's from now on, however long Temporal takes (a socket only bound, not listening, would not keep another
    SO_REUSEADDR server off it). Connections made meanwhile wait in its backlog; uvicorn then serves on it."""
    listening = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own: a restart rebinds at once
    try:
        listening.bind((settings.host, settings.port))
        listening.listen(socket.SOMAXCONN)
    except OSError as error:
        listening.close()
        log.error("comfyui-gateway api: cannot listen on %s:%d (HOST, PORT): %s; is another gateway or program "
                  "using the port?", settings.host, settings.port, error.strerror)
        sys.exit(os.EX_CONFIG)
    return listening


async def _serve(settings: Settings, *, api_socket: socket.socket | None, with_worker: bool) -> None:
    import uvicorn

    from api.http_server import server_config
    from api.main import create_app
    from worker.main import running_worker

    class EmbeddedServer(uvicorn.Server):
        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # this process handles SIGINT/SIGTERM itself and stops the parts in order

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:  # the port listens: said once, now, and not before
                log.info("API on http://%s:%d (docs at /docs)", settings.host, settings.port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    # A stop asked for while Temporal is awaited ends the wait: no connect attempts are left to run first.
    stopping = asyncio.create_task(stop.wait())
    connecting = asyncio.create_task(_connect(settings, for_worker=with_worker))
    await asyncio.wait([stopping, connecting], return_when=asyncio.FIRST_COMPLETED)
    if not connecting.done():
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        log.info("stopped before Temporal answered")
        return
    client = connecting.result()  # TemporalUnreachable after TEMPORAL_CONNECT_TIMEOUT_S
    async with AsyncExitStack() as stack:
        if with_worker:
            await stack.enter_async_context(running_worker(client, settings))
        server_task = None
        if api_socket is not None:
            server = EmbeddedServer(server_config(create_app(settings, client), settings))
            server_task = asyncio.create_task(server.serve(sockets=[api_socket]))
        waiters = [stopping] + ([server_task] if server_task else [])
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        log.info("shutting down")
        if server_task is not None:
            server.should_exit = True
            await server_task


def _cmd_dev(settings: Settings, _: argparse.Namespace) -> None:
    """Temporal dev server, worker and API as one process tree. The worker and the API are processes of
    their own, as in production, so that API traffic never delays the worker picking up tasks."""
    from app.child_processes import PartMisconfigured, RestartingPart
    from app.db import make_engine, migrate
    from app.devserver import TemporalUnavailable, start_temporal_dev_server
    from app.templates.store import prepare_database

    parts = [RestartingPart(command, [sys.executable, "-m", "app.cli", command]) for command in ("worker", "api")]
    temporal: TemporalDevServer | None = None
    exit_code = 0
    try:
        temporal = start_temporal_dev_server(settings)
        asyncio.run(temporal.wait_until_healthy(settings))  # only then may a part connect to the address
        log.info(
            "Temporal dev server on %s, Web UI on http://127.0.0.1:%d (log: %s)",
            settings.temporal_address, settings.temporal_ui_port, temporal.log_path,
        )
        engine = make_engine(settings.resolved_database_url)
        # The one-command set-up migrates by itself; the worker and the API it starts then find the schema current.
        migration = migrate(engine)
        log.info("database schema %s (was %s)", migration.after, migration.before)
        prepare_database(engine)  # once here, so that the worker and the API do not race to load templates
        engine.dispose()
        if settings.temporal_ui_url is None:  # each job's temporalUiUrl links into this dev server's Web UI
            os.environ["TEMPORAL_UI_URL"] = f"http://127.0.0.1:{settings.temporal_ui_port}"
        if settings.worker_metrics_address is None:
            _default_dev_worker_metrics()
        for part in parts:
            part.start()
        # The API says where it listens once it does, among its own lines.
        log.info("worker and API starting; Ctrl-C stops everything")  # the API warns of an open mode itself
        _supervise(temporal, parts)
    except TemporalUnavailable as failure:
        log.error("%s", failure)
        exit_code = 1
    except PartMisconfigured as failure:
        log.error("%s; stopping", failure)
        exit_code = os.EX_CONFIG
    finally:
        for part in reversed(parts):  # the API first, then the worker, then Temporal
            part.stop(timeout=30)
        if temporal is not None:
            temporal.stop()
        log.info("stopped")
    sys.exit(exit_code)


# dev's worker serves its metrics here unless WORKER_METRICS_ADDRESS says otherwise: dev runs one worker, so a
# fixed port (which would stop a second worker on a host) clashes with nothing of its own.
DEV_WORKER_METRICS_ADDRESS = ("127.0.0.1", 9464)


def _default_dev_worker_metrics() -> None:
    """Hand dev's worker DEV_WORKER_METRICS_ADDRESS, which it reads through Settings, if the port is free now;
    if another program has it, the worker goes without metrics rather than failing to start again and again."""
    host, port = DEV_WORKER_METRICS_ADDRESS
    try:
        socket.create_server((host, port)).close()
    except OSError as error:
        log.info("worker metrics off: %s:%d is not free (%s); WORKER_METRICS_ADDRESS names another address",
                 host, port, error.strerror)
        return
    os.environ["WORKER_METRICS_ADDRESS"] = f"{host}:{port}"
    log.info("worker metrics on http://%s:%d/metrics", host, port)


def _supervise(temporal: TemporalDevServer, parts: list[RestartingPart]) -> None:
    """Until SIGINT/SIGTERM, restart the parts that exit; a worker crash must not take the API down.
    Without its Temporal the gateway can do nothing, so Temporal exiting raises TemporalUnavailable; a part
    whose configuration is wrong raises PartMisconfigured."""
    from app.devserver import TemporalUnavailable

    stopping: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda received, _frame: stopping.append(received))
    while not stopping:
        if temporal.process.poll() is not None:
            raise TemporalUnavailable(temporal.exit_report())
        for part in parts:
            part.keep_running()
        time.sleep(0.2)


def _require_current_schema(settings: Settings, command: str) -> None:
    """Exit with what to run unless the database schema is at this code's head revision."""
    from app.db import SchemaNotCurrent, make_engine, require_current_schema

    engine = make_engine(settings.resolved_database_url)
    try:
        require_current_schema(engine)
    except SchemaNotCurrent as error:
        sys.exit(f"comfyui-gateway {command}: {error}")
    finally:
        engine.dispose()


def _cmd_api(settings: Settings, _: argparse.Namespace) -> None:
    import uvloop

    from app.temporal_client import TemporalUnreachable

    # Both before waiting for Temporal, which may take a minute.
    _require_current_schema(settings, "api")
    api_socket = _api_socket(settings)
    # uvloop: the API's event loop spends less of a request's time on itself (bench/polling.py: 7,900 reads
    # in a run on asyncio's own loop, 8,800 on uvloop). The worker keeps asyncio's loop, which the Temporal
    # SDK is tested on.
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(settings, api_socket=api_socket, with_worker=False))
    except TemporalUnreachable as error:
        log.error("comfyui-gateway api: %s", error)
        sys.exit(os.EX_UNAVAILABLE)


def _cmd_worker(settings: Settings, _: argparse.Namespace) -> None:
    from app.temporal_client import SearchAttributesMissing, TemporalUnreachable

    _require_current_schema(settings, "worker")
    try:
        asyncio.run(_serve(settings, api_socket=None, with_worker=True))
    except SearchAttributesMissing as error:
        sys.exit(f"comfyui-gateway worker: {error}")
    except TemporalUnreachable as error:
        log.error("comfyui-gateway worker: %s", error)
        sys.exit(os.EX_UNAVAILABLE)


async def _health(settings: Settings) -> dict[str, object]:
    import httpx

    from app.comfy.backends import configured_backends
    from app.comfy.client import ComfyClient
    from app.comfy.errors import ComfyError
    from app.temporal_client import connect_temporal

    report: dict[str, object] = {}
    async with httpx.AsyncClient(timeout=5) as http:
        for backend in configured_backends(settings):
            try:
                stats = await ComfyClient(backend.url, http).system_stats()
                report[backend.id] = {"url": backend.public_url, "reachable": True,
                                      "version": stats.get("system", {}).get("comfyui_version")}
            except ComfyError as error:
                report[backend.id] = {"url": backend.public_url, "reachable": False,
                                      "error": error.message}
    try:
        client = await asyncio.wait_for(connect_temporal(settings), timeout=5)
        report["temporal"] = {"address": settings.temporal_address, "reachable": await client.service_client.check_health()}
    except Exception as error:  # any failure to connect is what this command reports
        report["temporal"] = {"address": settings.temporal_address, "reachable": False, "error": str(error)}
    return report


async def _worker_health(settings: Settings) -> dict[str, object]:
    from api.probes import worker_polls_here
    from app.temporal_client import connect_temporal

    try:
        client = await asyncio.wait_for(connect_temporal(settings), timeout=5)
        polls = await worker_polls_here(client, settings.temporal_task_queue)
    except Exception as error:  # any failure to ask Temporal is what this command reports
        return {"worker": {"taskQueue": settings.temporal_task_queue, "reachable": False, "error": str(error)}}
    return {"worker": {"taskQueue": settings.temporal_task_queue, "reachable": polls}}


def _cmd_health(settings: Settings, args: argparse.Namespace) -> None:
    report = asyncio.run(_worker_health(settings) if args.worker else _health(settings))
    print(json.dumps(report, indent=2))
    sys.exit(0 if all(part["reachable"] for part in report.values()) else 1)  # type: ignore[index]


def _cmd_init(settings: Settings, args: argparse.Namespace) -> None:
    from app.settings import env_example

    for folder in (settings.data_dir, settings.resolved_storage_path):
        folder.mkdir(parents=True, exist_ok=True)
        print(f"folder  {folder}")
    example = Path(".env.example")
    if example.exists() and not args.force:
        print(f"kept    {example} (--force rewrites it)")
    else:
        example.write_text(env_example())
        print(f"wrote   {example}: copy it to .env and uncomment what you change")


def _cmd_migrate(settings: Settings, _: argparse.Namespace) -> None:
    from app.db import SchemaNotCurrent, make_engine, migrate

    engine = make_engine(settings.resolved_database_url)
    try:
        migration = migrate(engine)
    except SchemaNotCurrent as error:
        sys.exit(f"comfyui-gateway migrate: {error}")
    finally:
        engine.dispose()
    print(f"database  {engine.url!r}")
    print(f"before    {migration.before}")
    print(f"after     {migration.after}")


def _cmd_simulate(_: Settings | None, args: argparse.Namespace) -> None:
    from app.simulator.server import run_simulator

    run_simulator(host=args.host, port=args.port, data_dir=args.data_dir, time_scale=args.time_scale,
                  node_delay=args.node_delay)


def main(argv: list[str] | None = None) -> None:
    from app.cli_user import EXIT_CODES_HELP, add_commands as add_user_commands, run as run_user_command

    parser = argparse.ArgumentParser(prog="comfyui-gateway", description="ComfyUI Gateway: a durable REST gateway for ComfyUI.",
                                     epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"comfyui-gateway {version('comfyui-gateway')}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("dev", help="Temporal dev server + worker + API in one process tree")
    commands.add_parser("api", help="the REST API only, against TEMPORAL_ADDRESS")
    commands.add_parser("worker", help="the Temporal worker only, against TEMPORAL_ADDRESS")
    health = commands.add_parser("health", help="check that ComfyUI and Temporal answer")
    health.add_argument("--worker", action="store_true",
                        help="instead, check that a worker of this host polls TEMPORAL_TASK_QUEUE (a worker "
                             "container's health check)")
    commands.add_parser("migrate", help="upgrade the database schema (DATABASE_URL) to this release's")
    init = commands.add_parser("init", help="create the data folders and a commented .env.example")
    init.add_argument("--force", action="store_true", help="rewrite an existing .env.example")
    add_user_commands(commands)
    simulate = commands.add_parser(
        "simulate-comfyui", help="a ComfyUI simulator for tests and demos (no GPU, no models)"
    )
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=8188)
    simulate.add_argument("--data-dir", type=Path, default=Path("./data/simulator"))
    simulate.add_argument("--time-scale", type=float, default=1.0, help="multiplies the test nodes' sleep time")
    simulate.add_argument("--node-delay", type=float, default=0.0, help="seconds every executed node takes")
    args = parser.parse_args(argv)

    if hasattr(args, "run"):  # a command for people, through a running gateway's API: no settings, no logging set-up
        run_user_command(args)
        return
    # Imported here: app.logs loads Temporal's SDK (its loggers' context), which the commands for people never need.
    from app.logs import LogFormat, configure_logging

    if args.command == "simulate-comfyui":  # a stand-in for ComfyUI, without the gateway's settings
        configure_logging("INFO", LogFormat.text)
        _cmd_simulate(None, args)
        return
    settings = _load_settings()
    configure_logging(settings.log_level.value, settings.log_format)
    handlers = {
        "dev": _cmd_dev, "api": _cmd_api, "worker": _cmd_worker, "health": _cmd_health, "init": _cmd_init,
        "migrate": _cmd_migrate,
    }
    if args.command in _RUN_THE_TEMPORAL_SDK:
        from app.interpreter_exit import run_then_exit

        run_then_exit(lambda: handlers[args.command](settings, args))
    handlers[args.command](settings, args)


if __name__ == "__main__":
    main()
