"""``python -m engine._cli``: the ``shoal`` command."""

from ._app import main

main()
