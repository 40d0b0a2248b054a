"""`llmtune` with every fsync slowed down, so a test can kill -9 it in the middle of a checkpoint write."""

import os
import sys
import time

_fsync = os.fsync


def slow_fsync(fd):
    time.sleep(float(os.environ.get("SLOW_FSYNC_S", "0.3")))
    return _fsync(fd)


os.fsync = slow_fsync

if __name__ == "__main__":
    from llmtune.cli import main

    sys.argv = ["llmtune", *sys.argv[1:]]
    main()
