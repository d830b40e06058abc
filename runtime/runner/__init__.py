"""The runner: the child process that owns llama.cpp for one loaded model.

The server never loads llama.cpp. Each loaded model lives in a runner process started with
``python -m offload.runtime.runner``; the server talks to it over a local socket with the message
format in ``protocol``. A runner that crashes takes only its own requests down.

Importing this package loads nothing native: ``protocol`` is shared with the server side, while
the modules that import ``llama_cpp`` (``native``, ``engine``, ``batch``, ``sampling``,
``loader``, ``serve``) are imported only inside the runner process.
"""

# A switch for tests only: makes a runner fail in a chosen way so that the healing and crash paths
# can be exercised on any CPU. Values: "crash-first-eval-with-extra-bufts", "crash-first-eval",
# "hang-first-eval", "crash-after-tokens=N", "hang-after-tokens=N".
FAULT_ENV = "OFFLOAD_TEST_RUNNER_FAULT"
