"""``python -m offload.runtime.runner``: a runner process (see ``serve``)."""

from offload.runtime.runner.serve import main

main()
