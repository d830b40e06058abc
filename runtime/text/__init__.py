"""Text on either side of a model: prompts from templates (``prompt``, with bounded template
engines), grammars for answer formats (``grammar``), and tool calls and reasoning read back out of
what a model wrote (``tools``)."""
