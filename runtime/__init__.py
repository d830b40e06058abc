"""offload.runtime: runs models — engine (llama.cpp), scheduler, HTTP server, CLI."""

from offload.runtime import native as _native

# Before numpy can be imported through the planner: see native.py for why the order matters.
_native.preload()

__version__ = "0.1.0"
