"""``python -m agent.cli``: the same as the ``meshlet`` command."""

from .root import main

main()
