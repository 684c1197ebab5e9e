"""Web demo: `mmmamba serve` (FastAPI app, one HTML page, streamed answers)."""

from .app import create_app, memory_stats, serve

__all__ = ["create_app", "memory_stats", "serve"]
