"""``python -m offload.runtime.cli``: the ``offload`` command."""

from offload.runtime.cli.main import main

main()
