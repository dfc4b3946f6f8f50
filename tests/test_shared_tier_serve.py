"""Two `chunkcache serve` processes on one Redis: a chunk computed through one is a hit on the other, with
the same answer. Real processes, real HTTP, a real redis-server. Slow: each server loads its models."""
import subprocess
import sys
import time

import httpx
import pytest

from store.redislocal import free_port

pytestmark = pytest.mark.slow

DOCUMENTS = ["The Danube flows through ten countries before it reaches the Black Sea.",
             "Lake Baikal holds about a fifth of the fresh surface water on Earth."]


def start_server(store: str, model_dir: str, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "chunkcache.cli", "serve", "--store", store, "--create",
                             "--model", model_dir, "--port", str(port), "--threads", "1", "--max-new-tokens", "8"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(process: subprocess.Popen, url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited: {process.stderr.read()}"
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not ready after {seconds} s")


def test_two_servers_share_one_redis(redis_server, tiny_model_dir):
    store = redis_server.url + "?prefix=two-servers"
    ports = [free_port(), free_port()]
    servers = [start_server(store, tiny_model_dir, port) for port in ports]
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for process, url in zip(servers, urls):
            wait_ready(process, url)
        body = {"question": "Which river reaches the Black Sea?", "documents": DOCUMENTS, "mode": "blend"}
        first = httpx.post(f"{urls[0]}/query", json=body, timeout=60).json()
        second = httpx.post(f"{urls[1]}/query", json=body, timeout=60).json()
        assert (first["stats"]["chunk_misses"], second["stats"]["chunk_misses"]) == (2, 0)
        assert second["stats"]["chunk_hits"] == 2
        assert second["token_ids"] == first["token_ids"] and second["text"] == first["text"]
        metrics = httpx.get(f"{urls[1]}/metrics").text
        assert "chunkcache_chunk_hits_total 2.0" in metrics
    finally:
        for process in servers:
            process.terminate()
            process.wait(timeout=30)
