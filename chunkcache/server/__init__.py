"""chunkcache's HTTP API: `create_app(pipeline, settings)` for embedding and tests, `serve(args, open_pipeline)` for the CLI.

    from chunkcache import RAGPipeline
    from chunkcache.server import ServerSettings, create_app
    app = create_app(lambda: RAGPipeline.open("stores/demo"), ServerSettings(api_keys={"k1": "team-a"}))
"""
from .app import create_app
from .metrics import Metrics, NoMetrics
from .serve import serve
from .settings import API_KEYS_ENV, Limits, ServerSettings, parse_api_keys

__all__ = ["API_KEYS_ENV", "Limits", "Metrics", "NoMetrics", "ServerSettings", "create_app", "parse_api_keys",
           "serve"]
