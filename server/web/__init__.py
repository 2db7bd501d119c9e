"""The HTTP side of the server: JSON API, web dashboard and Prometheus metrics (FastAPI under uvicorn)."""

from server.web.app import create_app
from server.web.server import WebServer

__all__ = ["WebServer", "create_app"]
