"""The ``bloodcell`` command: parses arguments, calls the library, prints. It holds no policy."""

from .main import app

__all__ = ["app"]
