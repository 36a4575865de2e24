"""The ``adapruner`` console script: the library's commands plus the service's
(``serve``, ``api``, ``worker``, ``dashboard``, ``db upgrade``).

Service modules are imported only when one of their commands runs, so the library's commands work
without the service's extra dependencies installed.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from adapruner import cli as library_cli


def _settings(args: argparse.Namespace):
    from .settings import Settings

    overrides = {}
    if getattr(args, "db", None):
        overrides["database_url"] = args.db
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = Path(args.data_dir)
    return Settings(**overrides)


def _schema_checked(fn):
    """Run ``fn``; a database that was never upgraded is a user error (one line, exit 2)."""
    from adapruner.errors import AdaPrunerError

    from .db import SchemaError

    try:
        return fn()
    except SchemaError as exc:
        raise AdaPrunerError(str(exc)) from None


def cmd_db(args: argparse.Namespace) -> int:
    from .db import check_drift, upgrade

    settings = _settings(args)
    where = settings.db_url.split("@")[-1]
    if args.action == "check":  # the tables match the models (alembic check)
        _schema_checked(lambda: check_drift(settings.db_url))
        print(f"database {where}: the job tables match the models")
        return 0
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    print(f"database {where} at schema revision {upgrade(settings.db_url)}")
    return 0


def worker_devices(devices: str, visible: int) -> list[str]:
    """``--devices``: ``all`` visible GPUs, or GPU indices ``0,2``; one worker is started on each."""
    from adapruner.errors import AdaPrunerError

    if devices == "all":
        if not visible:
            raise AdaPrunerError("--devices all: no GPU is visible to this process (CUDA_VISIBLE_DEVICES, drivers)")
        return [f"cuda:{i}" for i in range(visible)]
    try:
        indices = [int(part) for part in devices.split(",")]
    except ValueError:
        raise AdaPrunerError(f"--devices takes all or GPU indices such as 0,1; got {devices!r}") from None
    bad = [i for i in indices if not 0 <= i < visible]
    if bad or len(set(indices)) != len(indices):
        raise AdaPrunerError(f"--devices {devices}: {visible} GPU(s) visible, indices must be distinct and in "
                             f"0..{visible - 1}")
    return [f"cuda:{i}" for i in indices]


def run_worker_per_device(args: argparse.Namespace, devices: list[str]) -> int:
    """One ``worker --device D`` process per device; SIGTERM and SIGINT are passed on (each drains)."""
    argv = [sys.executable, "-m", "service.cli", "worker", *(["--db", args.db] if args.db else []),
            *(["--data-dir", args.data_dir] if args.data_dir else []), *(["--dtype", args.dtype] if args.dtype else []),
            *(["--once"] if args.once else []), *(["--progress"] if args.progress else [])]
    children = [subprocess.Popen([*argv, "--device", device]) for device in devices]
    print(f"adapruner worker: {len(children)} workers on {', '.join(devices)}", file=sys.stderr, flush=True)

    def forward(signum, _frame):
        for child in children:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)


def private_files() -> None:
    """What this process writes from now on (the database, pruned models, artifacts, reports) is readable by
    its user alone: ``serve``, ``api`` and ``worker`` alike."""
    os.umask(0o077)


def cmd_worker(args: argparse.Namespace) -> int:
    from .worker import Worker

    if args.devices is not None:
        if args.device is not None:
            from adapruner.errors import AdaPrunerError

            raise AdaPrunerError("give --device or --devices, not both")
        import torch

        private_files()
        return run_worker_per_device(args, worker_devices(args.devices, torch.cuda.device_count()))

    private_files()
    logging.getLogger("adapruner.worker").setLevel(logging.INFO)
    worker = _schema_checked(lambda: Worker(_settings(args), device=args.device, dtype=args.dtype,
                                            progress=args.progress))
    worker.install_signal_handlers()
    worker.run(once=args.once)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    import optuna_dashboard

    from adapruner.search import artifact_store, make_storage

    settings = _settings(args)
    storage = make_storage(settings.db_url, create_tables=False)
    print(f"Optuna Dashboard on http://{args.host}:{args.port}/dashboard (bound to {args.host})", flush=True)
    optuna_dashboard.run_server(storage, host=args.host, port=args.port,
                                artifact_store=artifact_store(settings.artifacts))
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    """The HTTP API alone (the schema must be prepared by `adapruner db upgrade`)."""
    import uvicorn

    from .app import create_app

    private_files()
    app = _schema_checked(lambda: create_app(_settings(args)))
    print(f"AdaPruner API on http://{args.host}:{args.port} (docs: /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", proxy_headers=True)
    return 0


WORKER_CHECK_SECONDS = float(os.environ.get("ADAPRUNER_WORKER_CHECK_SECONDS", 5))


def ensure_token(settings) -> str:
    """The embedded server's API token: configured, or made once and kept in the data folder."""
    if settings.api_tokens:
        return settings.api_tokens[0]
    path = settings.data_dir / "api-token"
    if not path.is_file():
        # created readable by its owner only: never, even for a moment, by anyone else
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(secrets.token_urlsafe(24) + "\n")
    return path.read_text().strip()


def cmd_serve(args: argparse.Namespace) -> int:
    """API + local worker(s) + dashboard on one machine: the embedded default (SQLite, CPU)."""
    import uvicorn

    from .app import create_app
    from .db import upgrade

    private_files()
    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url)
    token = ensure_token(settings)
    env = {**os.environ, "ADAPRUNER_DATABASE_URL": settings.db_url, "ADAPRUNER_DATA_DIR": str(settings.data_dir),
           "ADAPRUNER_API_TOKENS": ",".join([token, *settings.api_tokens[1:]]),
           "ADAPRUNER_DASHBOARD_URL": f"http://{args.dashboard_host}:{args.dashboard_port}" if args.dashboard_port
           else ""}
    exe = [sys.executable, "-m", "service.cli"]
    worker_command = [*exe, "worker", *(["--device", args.device] if args.device else [])]
    workers = [subprocess.Popen(worker_command, env=env) for _ in range(args.workers)]
    children = list(workers)
    if args.dashboard_port:
        children.append(subprocess.Popen([*exe, "dashboard", "--host", args.dashboard_host, "--port",
                                          str(args.dashboard_port)], env=env))
    stopping = threading.Event()

    def restart_dead_workers():  # a worker that died (killed, out of memory) is replaced
        while not stopping.wait(WORKER_CHECK_SECONDS):
            for i, worker in enumerate(workers):
                if worker.poll() is not None and not stopping.is_set():
                    print(f"adapruner serve: worker {worker.pid} exited ({worker.returncode}); starting another",
                          file=sys.stderr, flush=True)
                    workers[i] = subprocess.Popen(worker_command, env=env)

    threading.Thread(target=restart_dead_workers, daemon=True).start()
    os.environ.update(env)
    from .settings import Settings

    app = create_app(Settings())
    print(f"AdaPruner API on http://{args.host}:{args.port} (docs: /docs); token in {settings.data_dir / 'api-token'}"
          if not settings.api_tokens else f"AdaPruner API on http://{args.host}:{args.port} (docs: /docs)", flush=True)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again: make that an exit that
    # runs the `finally` below, so the worker drains and the dashboard stops instead of being orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        stopping.set()
        children = workers + children[len(workers):]  # the workers running now
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
    return 0


def add_service_commands(sub) -> None:
    def common(p):
        p.add_argument("--db", default=None, help="database URL (default: $ADAPRUNER_DATABASE_URL, else SQLite "
                                                  "in the data folder)")
        p.add_argument("--data-dir", default=None,
                       help="data folder (default: $ADAPRUNER_DATA_DIR or ./adapruner-data)")

    p = sub.add_parser("serve", help="API + local worker + dashboard in one command (SQLite, CPU by default)")
    common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--dashboard-port", type=int, default=8081, help="0 to run no dashboard")
    p.add_argument("--dashboard-host", default="127.0.0.1",
                   help="the dashboard's bind address, apart from the API's: it has no auth (default: localhost)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default: 1)")
    p.add_argument("--device", default=None, help="device of the local workers (default: CUDA when present)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("api", help="the HTTP API alone (for deployments with separate workers)")
    common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("worker", help="claim jobs from the database and run their trials")
    common(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")
    p.add_argument("--devices", default=None, metavar="all|I,J",
                   help="start one worker per GPU: all visible ones, or the indices given")
    p.add_argument("--dtype", default=None)
    p.add_argument("--once", action="store_true", help="exit when no job has work left")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("dashboard", help="Optuna Dashboard on the jobs' storage and artifacts")
    common(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only; it has no auth)")
    p.add_argument("--port", type=int, default=8081)
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("db", help="database schema")
    common(p)
    p.add_argument("action", choices=["upgrade", "check"],
                   help="upgrade: create or migrate the tables; check: find drift between tables and models")
    p.set_defaults(func=cmd_db)


def build_parser():
    return library_cli.build_parser(add_service_commands)


def main(argv: Sequence[str] | None = None) -> int:
    return library_cli.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
