"""The HTTP side: /metrics, /healthz and the /v1 REST API, served by uvicorn."""
