"""`[core] hostname_callable` of the test's workers: each reports the name of its own machine.

Both workers run on this host; in a deployment each is a machine or container whose hostname
tells them apart. Task instances record this name, as they would record a real hostname.
"""

from __future__ import annotations

import os


def worker_hostname() -> str:
    """The worker's name from IMGPIPE_WORKER_HOSTNAME (set per worker by the cluster)."""
    return os.environ["IMGPIPE_WORKER_HOSTNAME"]
