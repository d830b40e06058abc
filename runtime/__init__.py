"""offload.runtime: runs models — runner processes (llama.cpp), scheduler, HTTP server, CLI."""

__version__ = "0.1.0"
