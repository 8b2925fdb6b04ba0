"""PID 1 of the torchship image: ``python3 entrypoint.py serve ...`` runs ``torchship``.

PID 1 gets no default signal handling: a SIGTERM it has no handler for is dropped. The
server installs its own (it drains, then exits 0), but importing torch takes seconds,
and a container stopped in that window would wait out the whole grace period and be
killed. Until the server takes over, SIGTERM ends the process at once: nothing is
being served yet, so nothing is lost.
"""

import signal
import sys


def _stop_before_serving(signum: int, frame: object) -> None:
    sys.exit(0)


signal.signal(signal.SIGTERM, _stop_before_serving)

from torchship.cli import main  # noqa: E402  (the handler must come first)

sys.exit(main())
