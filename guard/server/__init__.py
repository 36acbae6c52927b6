"""`misguard serve`: the guard as an OpenAI-compatible HTTP server in front of a deployed VLM.

Layered as vLLM's OpenAI server is: protocol (request and error bodies), the guard service (rails, upstream,
audit, metrics), and thin FastAPI routes (app). Needs the `guard` extra: pip install 'misguard[guard]'.
"""
from misguard.core.errors import MissingExtraError

try:  # the `guard` extra: without it, importing the server is one line saying what to install
    import fastapi  # noqa: F401
    import httpx  # noqa: F401
    import prometheus_client  # noqa: F401
    import uvicorn  # noqa: F401
    import yaml  # noqa: F401
except ModuleNotFoundError as exc:
    raise MissingExtraError(exc.name or "fastapi", "guard") from None
