"""The service: the FastAPI app, its web page and the API (needs the 'serve' extra)."""
