"""Between the HTTP faces and the runners: which models run where, and the work behind a request.

``scheduler`` keeps runner processes (``process``) loaded, planned through ``planning``;
``service`` turns a typed request into a prompt, runs it on a runner and yields Ollama-shaped
chunks; the rest are its helpers (options, validation, embeddings, calibration, healing, safety).
"""
