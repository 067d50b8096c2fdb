"""Where this process stands in a group of training processes (accelerate launch / torchrun), and the few
collective steps a run needs: one writer, a barrier, a name agreed on, the group closed after training.

    if is_main(): write(...)          # rank 0, the only process outside a launcher
    wait_for_everyone()               # a barrier in a group; nothing outside one

Outside a launcher every function is a no-op for one process. Imports no other lowvram module, so the
modules that train (train.py, checkpoints.py) can ask "am I the writer?" without pulling in the planner.
torch and accelerate are imported only inside a launched group.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys


def world_size() -> int:
    """Processes in the group (1 outside a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def in_group() -> bool:
    """Started by a launcher (accelerate launch / torchrun) with more than one process."""
    return world_size() > 1


def is_main() -> bool:
    """The one process that prints and writes files (rank 0; the only one outside a launcher)."""
    return rank() == 0


def launched_strategy() -> str:
    """The parallel mode this group was launched with: what accelerate's launcher put in the environment."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    return "ddp"


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when its launcher dies (a kill -9 of it leaves no worker behind)."""
    if not sys.platform.startswith("linux"):
        return
    # PR_SET_PDEATHSIG. No getppid() == 1 check for a launcher already gone: in a container the launcher may be PID 1
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)


def join(stack: contextlib.ExitStack) -> None:
    """In a launched group: connect to the others (gloo on CPU, NCCL on CUDA) and silence all but the main process.

    accelerate's PartialState is the one the trainers use later; creating it here first lets the run
    directory be agreed on and checked before any model loads.
    """
    if not in_group():
        return
    _die_with_parent()
    # Ctrl-C reaches the workers once, through their launcher (torchrun forwards it), not a second time from
    # the terminal: a second Ctrl-C means "stop now" (lowvram.train.callbacks.graceful_interrupt)
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    import torch
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())
    if not is_main():  # one writer: progress, plans and summaries come from the main process only
        devnull = stack.enter_context(open(os.devnull, "w"))  # noqa: SIM115 - closed by the stack
        stack.enter_context(contextlib.redirect_stdout(devnull))


def wait_for_everyone() -> None:
    """A barrier across the group; nothing outside one."""
    if in_group():
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def same_on_all(value: str) -> str:
    """The main process's `value` on every process (a new run directory's timestamped name)."""
    if not in_group():
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def leave() -> bool:
    """After training: close the group. True in the main process, which goes on alone (report, export).

    Reports, the reward model, evaluation and the GGUF export are one process's work: they run in
    the main process after the others have finished and the group is gone, as in a one-card run.
    """
    if not in_group():
        return True
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    main = is_main()
    PartialState().wait_for_everyone()
    if dist.is_initialized():
        dist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    for key in (
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "ROLE_RANK",
        "ACCELERATE_USE_FSDP",
        "ACCELERATE_USE_DEEPSPEED",
    ):
        os.environ.pop(key, None)
    return main
