"""`--nproc-per-node N`: torch.distributed.run in a process of ours, so that a failed rank ends the way a
single process does. A user error is printed by rank 0 as one line and every rank exits 2; torchrun
would then add its own traceback and failure table and exit 1. Here the launcher exits with the ranks'
code instead (2 for a user error, 3 for a run that stopped itself), and a crash is one line naming the rank."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux PR_SET_PDEATHSIG; elsewhere a
    no-op): a helper process, or a pipeline stage's, never outlives a killed parent."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _pass_usr1_to_ranks() -> None:
    """SIGUSR1 (SLURM's warning, or a pipeline runner's) asks each rank to save and stop. torchrun neither
    handles it (it would end the launcher) nor passes it on, and its ranks run in sessions of their own."""
    import psutil

    def forward(signum, frame):
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                child.send_signal(signum)

    signal.signal(signal.SIGUSR1, forward)


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    _pass_usr1_to_ranks()
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # per-rank failure notices
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        codes = {rank: failure.exitcode for rank, failure in e.failures.items()}
        for code in (2, 3):  # the ranks said why, on one line
            if code in codes.values():
                return code
        rank, code = min(codes.items()) if codes else (0, 1)
        print(f"megaflow: stopped: rank {rank} exited with code {code} (its output is above)", file=sys.stderr)
        return code if code > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
