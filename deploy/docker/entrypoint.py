"""PID 1 of the torchship image: ``python3 entrypoint.py serve ...`` runs ``torchship``.

PID 1 gets no default signal handling: a SIGTERM it has no handler for is dropped. The
server installs its own (it drains, then exits 0), but importing torch takes seconds,
and a container stopped in that window would wait out the whole grace period and be
killed. Until the server takes over, SIGTERM ends the process at once: nothing is
being served yet, so nothing is lost.

At once means ``os._exit``, not ``sys.exit``: unwinding into interpreter shutdown while a
runtime's native threads run can abort the process ("terminate called without an active
exception", exit 139) or hang it until the grace period runs out (137). Once the server
has its handler, it drains, stops its model loader and returns normally.
"""

import contextlib
import os
import signal
import sys


def _stop_before_serving(signum: int, frame: object) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing to lose
            stream.flush()
    os._exit(0)


signal.signal(signal.SIGTERM, _stop_before_serving)

from torchship.cli import main  # noqa: E402  (the handler must come first)

sys.exit(main())
