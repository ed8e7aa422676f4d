"""
How a training run stops early and ends under torchrun.

    ctrl_c = CtrlC()                  # Ctrl-C now asks to stop after the current iteration
    if ctrl_c.agreed(device): ...     # save and stop (under torchrun: all processes together)
    replica_difference(model)         # torchrun: 0 when every process holds the same weights
    exit_without_shutdown()           # torchrun: the end of a finished run
"""
import os
import signal
import sys
import time

import torch


class CtrlC:
    """Ctrl-C: finish the iteration, save, exit. Another Ctrl-C more than a second later stops
    at once; one sooner is the same Ctrl-C again (torchrun forwards the terminal's to its
    processes, which have it already)."""

    def __init__(self):
        self.at = 0.0  # when Ctrl-C came (time.time()); 0: it did not
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.at and time.time() - self.at > 1:
            raise KeyboardInterrupt
        self.at = self.at or time.time()

    def agreed(self, device):
        """Whether to stop now: under torchrun, when any process had a Ctrl-C (a collective)."""
        if not torch.distributed.is_initialized():
            return bool(self.at)
        flag = torch.tensor(float(bool(self.at)), device=device)
        torch.distributed.all_reduce(flag)
        return flag.item() > 0


def replica_difference(model):
    """The largest difference between the processes' per-parameter sums (a collective). DDP keeps
    the replicas equal only if every process took the same steps: this checks that it did."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
    gathered = [torch.zeros_like(sums) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather_object(gathered, sums)
    return max((g - gathered[0]).abs().max().item() for g in gathered)


def exit_without_shutdown():
    """Leaves the process group and the process, once every file is closed. After a finished
    gloo run, torch sometimes aborts while the interpreter shuts down ("terminate called
    without an active exception"), and torchrun then reports a complete run as failed."""
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
