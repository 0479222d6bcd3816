"""A throwaway ``redis-server`` for tests: its own free port, no persistence, killed and
restarted on the same port by fault tests. The shared Redis on 6379 is never touched.

Without a ``redis-server`` binary the tests that need one fail when ``CI=true`` and are
skipped with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from tests.support import free_port, missing_service

__all__ = ["RedisServer", "redis_server_binary", "throwaway_redis"]


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        missing_service("redis-server is not installed (apt-get install redis-server)")
    return binary


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1; ``kill()`` and ``start()`` keep the port."""

    def __init__(self, directory: Path, port: int | None = None, *extra_args: str):
        self.binary = redis_server_binary()
        self.directory = directory
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            *self.extra_args,
        ]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.directory
        )
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if _accepts(self.port):
                with contextlib.suppress(redis.exceptions.RedisError):
                    if self.client().ping():
                        return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: Redis vanishes mid-traffic, as in a crash (nothing is saved)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def client(self) -> redis.Redis:
        password = None
        if "--requirepass" in self.extra_args:
            password = self.extra_args[self.extra_args.index("--requirepass") + 1]
        return redis.Redis(host="127.0.0.1", port=self.port, password=password, socket_timeout=5)


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def throwaway_redis(directory: Path, *extra_args: str) -> Iterator[RedisServer]:
    server = RedisServer(directory, None, *extra_args)
    server.start()
    try:
        yield server
    finally:
        server.kill()
