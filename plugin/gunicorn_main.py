"""gunicorn's master on the listening socket ``veritas plugin serve`` passes as fd 3.

The socket is handed over the systemd way (LISTEN_FDS/LISTEN_PID naming this process), so gunicorn
serves the inherited socket and, at exit, neither closes it for others nor unlinks its path: with
``--bind fd://3`` it would unlink the path, which may be another plugin's socket by then.
"""

from __future__ import annotations

import os
import sys

from gunicorn.app.wsgiapp import run

if __name__ == "__main__":
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())
    sys.argv[0] = "gunicorn"
    run()  # returns only when gunicorn has stopped
    sys.exit(0)
