"""torchrun for the trainer (``launch/cpt_8gpu.sh`` runs it): ``python -m megatron_ext.launch ARGS`` is
``python -m torch.distributed.run ARGS``, except after a SIGTERM (a preemption, a scheduler's time limit) that the
ranks answered by saving a checkpoint. torchrun raises the signal as an error whatever its ranks did, so the job
ended with status 1 and a traceback: failed, to the scheduler, which then never starts a job queued to resume it
(Slurm's ``--dependency=afterok``). Here it ends with status 0 and one line naming the step saved; a SIGTERM that
found no save done (the ranks killed, a save that failed) still ends as torchrun's error."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from megatron_ext.signals import STOPPED_FILE_ENV


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    fd, stopped = tempfile.mkstemp(prefix="neurocpt-stopped-")  # the trainer writes here (signals.record_stop)
    os.close(fd)
    os.environ[STOPPED_FILE_ENV] = stopped
    try:
        torchrun(argv)
    except SignalException as err:
        saved = Path(stopped).read_text()
        if not saved:
            raise
        print(f"stopped by {err.sigval.name} after the ranks {saved}: run the same command to resume", file=sys.stderr)
    finally:
        os.unlink(stopped)


if __name__ == "__main__":
    main()
