"""`chunkcache serve`: the real pipeline under uvicorn."""
from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING, Callable

from .app import create_app
from .settings import ServerSettings

if TYPE_CHECKING:
    from ..pipeline import RAGPipeline

log = logging.getLogger("chunkcache.server")


def serve(args, open_pipeline: Callable[[], RAGPipeline]) -> None:
    """Run the API on args.host:args.port over the pipeline `open_pipeline` opens (the CLI's, from the
    same flags as `chunkcache query`). The model loads in the background; /healthz says when it is ready."""
    import uvicorn

    settings = ServerSettings.from_args(args, base=getattr(getattr(args, "settings", None), "server", None))
    if not settings.auth_enabled and not _is_loopback(args.host):
        log.warning("serving on %s without API keys: anyone who can reach it can use it "
                    "(set CHUNKCACHE_API_KEYS=key or key:tenant,...)", args.host)
    if settings.metrics_need_admin and settings.admin_key is None:
        log.warning("API keys are set but no admin key: /metrics answers 403 to everyone "
                    "(set CHUNKCACHE_ADMIN_KEY to read it)")
    app = create_app(open_pipeline, settings)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=30))

    def stop() -> None:
        server.should_exit = True

    app.state.on_load_failure = stop
    server.run()
    if app.state.service.failed:
        raise RuntimeError("the model failed to load (the log above says why); the server stopped")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
