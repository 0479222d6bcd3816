"""A collector run as its own process (``python -m collector run --config F``), for tests
that kill it, run two of it, or measure its memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
import yaml

__all__ = ["CollectorProcess"]


class CollectorProcess:
    def __init__(
        self,
        config: dict[str, Any] | Path,
        directory: Path,
        port: int,
        env: dict[str, str] | None = None,
        ca_file: Path | None = None,
    ):
        """``config`` is a dict (written to DIR/collector.yaml) or a config file's path;
        with ``ca_file`` the listener is HTTPS, verified against that CA."""
        self.directory = directory
        self.port = port
        if isinstance(config, Path):
            self.config_path = config
        else:
            self.config_path = directory / "collector.yaml"
            self.config_path.write_text(yaml.safe_dump(config))
        self.env = {**os.environ, **(env or {})}
        self.ca_file = ca_file
        self.log_path = directory / "collector.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        scheme = "https" if self.ca_file else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "collector", "run", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
            env=self.env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                verify: str | bool = str(self.ca_file) if self.ca_file else True
                if requests.get(f"{self.base}/readyz", timeout=1, verify=verify).ok:
                    return
            except requests.ConnectionError:
                pass
            if self.process.poll() is not None:
                raise AssertionError(f"collector exited:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"collector did not start:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def peak_rss(self) -> int:
        """The process's peak resident set size so far (``VmHWM``), in bytes."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc status")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no drain, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the collector drains what it accepted."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise
        finally:
            self.process = None
        return code
