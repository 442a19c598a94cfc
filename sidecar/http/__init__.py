"""The OpenAI-compatible HTTP front (`sidecar.http.front`) and its error table."""
