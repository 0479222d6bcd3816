"""``calltrace run | validate | schema | keys``."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import logging
import os
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from collector.config import ConfigError, ServiceConfig, load_config

if TYPE_CHECKING:
    from collector.service import Service

DEFAULT_CONFIG = "collector.yaml"
EMBEDDED_CONFIG = Path(__file__).with_name("default.yaml")
DEFAULT_KEY_STORE = "./data/calltrace.db"

log = logging.getLogger("calltrace")


def _config_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    local = Path(DEFAULT_CONFIG)
    return local if local.exists() else EMBEDDED_CONFIG


def _load_or_exit(arg: str | None) -> ServiceConfig:
    path = _config_path(arg)
    try:
        return load_config(path)
    except ConfigError as exc:
        _invalid(path, exc)


def _invalid(path: Path | None, exc: ConfigError) -> NoReturn:
    print(f"{path}: invalid config:", file=sys.stderr)
    for error in exc.errors:
        print(f"  {error}", file=sys.stderr)
    raise SystemExit(1) from None


def _build_or_exit(config: ServiceConfig) -> Service:
    """The service graph of ``config``: every start-up check short of connecting to a
    server or opening a port (``run`` and ``validate`` share it, so they cannot drift)."""
    from collector.service import Service

    try:
        return Service(config)
    except ConfigError as exc:
        _invalid(config.path, exc)


def cmd_schema(args: argparse.Namespace) -> int:
    from collector.config import json_schema

    print(json.dumps(json_schema(builtin_only=args.builtin), indent=2))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    config = _load_or_exit(args.config)
    _build_or_exit(config)
    pipelines = ", ".join(config.pipelines)
    print(f"{config.path}: valid (pipelines: {pipelines})")
    return 0


async def _serve(config: ServiceConfig) -> None:
    service = _build_or_exit(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
        # Everything built so far (modules, config, components) lives as long as the
        # process: out of the collector's sight, a full collection does not walk it.
        gc.freeze()
        log.info("ready (config %s)", config.path)
        await stop.wait()
        log.info("signal received: draining accepted data")
    finally:
        await service.shutdown()


def _run_loop(coro: object) -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not on Windows): the stdlib loop works too
        asyncio.run(coro)  # type: ignore[arg-type]
        return
    uvloop.run(coro)  # type: ignore[arg-type]


def cmd_run(args: argparse.Namespace) -> int:
    config = _load_or_exit(args.config)
    assert config.service is not None
    _setup_logging(config.service.telemetry.log_level)
    workers = config.service.workers
    if workers > 1 and os.environ.get("CALLTRACE_WORKER") is None:
        _build_or_exit(config)  # mistakes reported once, not by every worker
        return _run_workers(workers)
    _tune_runtime()
    try:
        _run_loop(_serve(config))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except (ValueError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


SWITCH_INTERVAL = 0.0005
"""Seconds a thread may hold the GIL while another waits for it (Python's default: 5 ms).

The SQLite writer thread runs long stretches of Python building rows; at the default
the event loop waits up to 5 ms for each turn while it does, which shows in every
request's latency under load. A shorter interval costs a little CPU in switches."""


def _tune_runtime() -> None:
    """Interpreter settings for a long-running ingest process.

    ``CALLTRACE_SWITCH_INTERVAL`` (seconds) and ``CALLTRACE_GC`` (``gen0,gen1,gen2``
    thresholds) override them, for experiments.
    """
    sys.setswitchinterval(float(os.environ.get("CALLTRACE_SWITCH_INTERVAL") or SWITCH_INTERVAL))
    _limit_malloc_arenas()
    gc_setting = os.environ.get("CALLTRACE_GC")
    if gc_setting:
        gc.set_threshold(*(int(x) for x in gc_setting.split(",")))


_M_ARENA_MAX = -8  # glibc's malloc.h


def _limit_malloc_arenas() -> None:
    """One malloc heap for every thread, as ``MALLOC_ARENA_MAX=1`` would set.

    glibc gives each thread that allocates a heap ("arena") of its own, and memory freed
    in one is rarely handed back: the writer thread's span bytes (over pymalloc's 512
    bytes, so from malloc) would keep its arena's high-water mark resident. One heap
    costs no throughput: Python allocates under the GIL, so the threads seldom contend
    for it.
    A ``MALLOC_ARENA_MAX`` set by the user wins; elsewhere than glibc this does nothing.
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_ARENA_MAX, 1)


def _run_workers(workers: int) -> int:
    """Run N copies of this process; they share the listening ports (SO_REUSEPORT)."""
    import subprocess

    children = []
    for index in range(workers):
        env = dict(os.environ, CALLTRACE_WORKER=str(index))
        children.append(
            subprocess.Popen([sys.executable, "-m", "collector", *sys.argv[1:]], env=env)
        )

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)


def _key_store_location(args: argparse.Namespace) -> tuple[str, str]:
    """The key store (SQLite path or PostgreSQL DSN) and PostgreSQL schema to manage."""
    if args.db:
        return args.db, args.schema
    config = _load_or_exit(args.config)
    for spec in config.processors.values():
        store = getattr(spec.config, "key_store", None)
        if store:
            return str(store), getattr(spec.config, "key_store_schema", args.schema)
    return DEFAULT_KEY_STORE, args.schema


async def _keys_command(args: argparse.Namespace) -> int:
    from collector.keys import KeyStore, PostgresKeyStore, is_postgres_location

    location, schema = _key_store_location(args)
    shared = is_postgres_location(location)
    store: Any = PostgresKeyStore(location, schema) if shared else KeyStore(Path(location))

    async def call(method: str, *call_args: Any) -> Any:
        result = getattr(store, method)(*call_args)
        return await result if shared else result

    if shared:
        await store.open()
    try:
        if args.keys_command == "create":
            key, record = await call("create", args.project)
            print(key)
            print(
                f"# key id {record.key_id}, project {record.project}; store it now, "
                "it is not shown again",
                file=sys.stderr,
            )
        elif args.keys_command == "list":
            print(f"{'KEY ID':<20} {'PROJECT':<20} {'CREATED':<20} STATUS")
            for rec in await call("list", args.project):
                created = datetime.fromtimestamp(rec.created_ns / 1e9, UTC)
                status = "revoked" if rec.revoked else "active"
                print(f"{rec.key_id:<20} {rec.project:<20} {created:%Y-%m-%d %H:%M:%S}  {status}")
        elif args.keys_command == "revoke":
            revoked = await call("revoke", args.key)
            if revoked is None:
                print(_no_active_key(args.key), file=sys.stderr)
                return 1
            print(f"revoked {revoked}")  # the id: the argument may be the key itself
    finally:
        await call("close")
    return 0


def _no_active_key(key_or_id: str) -> str:
    """Why ``keys revoke`` found nothing, without echoing an argument that may be a key."""
    from collector.keys import KEY_ID_PREFIX, KEY_PREFIX

    if key_or_id.startswith(KEY_ID_PREFIX):
        return f"no active key with id {key_or_id}"
    if key_or_id.startswith(KEY_PREFIX) and len(key_or_id) == len(KEY_PREFIX) + 8:
        return "no active key with that id: key ids have changed, see `calltrace keys list`"
    return "no active key matches the key given"


def cmd_keys(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_keys_command(args))
    except (OSError, ValueError) as exc:
        print(f"calltrace keys: {exc}", file=sys.stderr)
        return 1


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calltrace", description="OpenTelemetry trace collector for voice-AI agents"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the collector")
    run.add_argument("--config", "-c", help=f"config file (default: ./{DEFAULT_CONFIG})")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check a config file and list every mistake")
    validate.add_argument("--config", "-c", help=f"config file (default: ./{DEFAULT_CONFIG})")
    validate.set_defaults(func=cmd_validate)

    schema = sub.add_parser(
        "schema", help="print the config file's JSON Schema (installed components included)"
    )
    schema.add_argument(
        "--builtin", action="store_true", help="only calltrace's own components (no plugins)"
    )
    schema.set_defaults(func=cmd_schema)

    keys = sub.add_parser("keys", help="manage API keys")
    keys.add_argument("--config", "-c", help="config whose auth processor names the key store")
    keys.add_argument(
        "--db",
        help=f"key store: an SQLite file or postgresql://... (default: {DEFAULT_KEY_STORE})",
    )
    keys.add_argument("--schema", default="calltrace", help="PostgreSQL schema of the keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it once")
    create.add_argument("--project", "-p", required=True)
    listing = keys_sub.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--project", "-p")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id or the key itself")
    revoke.add_argument("key")
    keys.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
