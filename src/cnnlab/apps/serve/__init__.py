"""``cnnlab serve``: a page to try a trained run on images, and a JSON API.

Needs the web extras: fastapi, uvicorn and python-multipart.
"""
from cnnlab.apps.serve.app import DEFAULT_MAX_BYTES, create_app, serve

__all__ = ["DEFAULT_MAX_BYTES", "create_app", "serve"]
