"""The ``shoal`` command line (Typer and rich are imported only in this package)."""

from ._app import build_app as build_app
from ._app import main as main

__all__ = ["build_app", "main"]
