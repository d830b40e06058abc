"""The child-process side of the runtime: code that loads llama.cpp runs here, never in the server or CLI."""
