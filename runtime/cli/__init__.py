"""The ``offload`` command: thin faces over the server (through ``client``) and the library."""

from offload.runtime.cli.main import cli, main

__all__ = ["cli", "main"]
