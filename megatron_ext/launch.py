"""torchrun for the trainer (``launch/cpt_8gpu.sh`` runs it): ``python -m megatron_ext.launch ARGS`` is
``python -m torch.distributed.run ARGS``, except after a SIGTERM (a preemption, a scheduler's time limit) that lost
no step: one the ranks answered by saving a checkpoint, or one while they started (importing, loading the model:
nothing to save yet). torchrun raises the signal as an error whatever its ranks did, so the job ended with status
1 and a traceback: failed, to the scheduler, which then never starts a job queued to resume it (Slurm's
``--dependency=afterok``). Here it ends with status 0 and one line saying which; a SIGTERM that ended training
without a save (the ranks killed, a save that failed) still ends as torchrun's error. Not covered: a SIGTERM before
torchrun starts the ranks (this module's imports, torchrun's wait for the other nodes, a C++ call in which Python
would run no handler) ends the launcher as a signal does, a failed job."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from megatron_ext.signals import STOPPED_FILE_ENV, TRAINING


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    fd, stopped = tempfile.mkstemp(prefix="neurocpt-stopped-")  # the trainer writes here (megatron_ext.signals)
    os.close(fd)
    os.environ[STOPPED_FILE_ENV] = stopped
    try:
        torchrun(argv)
    except SignalException as err:
        said = Path(stopped).read_text()
        if said == TRAINING:
            raise
        when = f"after the ranks {said}" if said else "before the ranks began training (nothing to save yet)"
        print(f"stopped by {err.sigval.name} {when}: run the same command to resume", file=sys.stderr)
    finally:
        os.unlink(stopped)


if __name__ == "__main__":
    main()
