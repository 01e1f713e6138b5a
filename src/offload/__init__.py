"""Remote execution for shoal: backends that run actions elsewhere, and their storage.

``engine`` never imports this package at import time; backends and stores
are resolved by name when a run first needs them.
"""

__all__: list[str] = []
