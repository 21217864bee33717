"""`lmloom` under torchrun with one rank SIGKILLed right after a chosen checkpoint (crash-recovery tests).

Environment: KILL_AFTER_CHECKPOINT (step), KILL_RANK (default 1), KILL_STAMP (a file that receives the
time of the kill, so the test can measure how fast the launch stops). Arguments: those of `lmloom`.
"""

import os
import signal
import sys
import time

from lmloom.train import runners

KILL_STEP = int(os.environ["KILL_AFTER_CHECKPOINT"])
KILL_RANK = int(os.environ.get("KILL_RANK", "1"))
_save = runners.ParallelRunner.save


def save_then_die(self, model, optimizer, state, keep):
    _save(self, model, optimizer, state, keep)
    if state.step == KILL_STEP and int(os.environ["RANK"]) == KILL_RANK:
        self._wait()  # this rank's part of the checkpoint is written
        with open(os.environ["KILL_STAMP"], "w") as stamp:
            stamp.write(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)


runners.ParallelRunner.save = save_then_die

if __name__ == "__main__":
    from lmloom.cli import main

    sys.argv = ["lmloom", *sys.argv[1:]]
    main()
