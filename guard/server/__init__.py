"""`misguard serve`: the guard as an OpenAI-compatible HTTP server in front of a deployed VLM.

Layered as vLLM's OpenAI server is: protocol (request and error bodies), the guard service (rails, upstream,
audit, metrics), and thin FastAPI routes (app). Needs the `guard` extra: pip install 'misguard[guard]'.
"""
