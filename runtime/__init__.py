"""offload.runtime: runs models — engine (llama.cpp), scheduler, HTTP server, CLI."""

__version__ = "0.1.0"
