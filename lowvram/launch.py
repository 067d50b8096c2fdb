"""`lowvram run --gpus N`: the same recipe in several processes, launched and connected by Hugging Face accelerate.

    lowvram run demo --gpus 2                          # accelerate launch --num_processes 2 ... -m lowvram run demo
    accelerate launch -m lowvram run demo              # the same, under your own `accelerate config`
    accelerate launch --num_machines 2 --machine_rank R --main_process_ip HOST -m lowvram run demo   # two nodes

lowvram writes no launcher and no collectives of its own: `--gpus N` runs accelerate's own
`accelerate launch` (torchrun underneath) and the TRL trainers inside use accelerate for DDP, FSDP
or DeepSpeed. What a lowvram run needs on top:
- the plan per card: each process gets its share of the global effective batch (lowvram/plan/parallel.py);
- one writer: only the main process prints progress and writes files (lowvram/utils/dist.py);
- the group ends together: every process dies with its launcher, and a failed process ends the
  group (torchrun stops the others) with one clear message (`launch`, here).
Without a GPU the processes run on CPU with the gloo backend: that is how the tests check it.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys

from lowvram.errors import EXIT_CHECK_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_OUT_OF_MEMORY, EXIT_USER_ERROR, UserError
from lowvram.pipeline import Run, RunRequest, open_run, training_device
from lowvram.plan.parallel import plan_per_card
from lowvram.utils.children import python_module_cmd
from lowvram.utils.dist import in_group, world_size

# ------------------------------------------------------------------ `lowvram run --gpus N`


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_args(world: int, mode: str, cuda: bool) -> list[str]:
    """`accelerate launch` flags for one machine with `world` processes in `mode`."""
    args = [
        "--num_processes",
        str(world),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
    ]
    if mode == "fsdp":
        # LoRA on a sharded base: PEFT's recommended settings; 4-bit weights need use_orig_params off
        args += [
            "--use_fsdp",
            "--fsdp_version",
            "2",
            "--fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP",
            "--fsdp_state_dict_type",
            "FULL_STATE_DICT",
            "--fsdp_cpu_ram_efficient_loading",
            "true",
            "--fsdp_reshard_after_forward",
            "true",
        ]
    elif mode == "deepspeed":
        args += ["--use_deepspeed", "--zero_stage", "2"]
    else:
        # torchrun also on CPU: accelerate's --cpu launcher starts several processes only under mpirun
        args += ["--multi_gpu"]
    return args


def launch(world: int, mode: str, lowvram_args: list[str], cuda: bool, resume_hint: str = "") -> int:
    """Run `lowvram <lowvram_args>` in `world` processes under accelerate launch; its exit status.

    The launcher runs in this process group: Ctrl-C or a kill of the group reaches every process,
    and each worker also dies with the launcher. torchrun ends the whole group when one process fails;
    the launcher then says which one and how (`_launcher_main`).
    """
    cmd = python_module_cmd("lowvram.launch", [*launch_args(world, mode, cuda), "-m", "lowvram", *lowvram_args])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), _ENV_HINT: resume_hint}
    shown = shlex.join(["accelerate", "launch", *launch_args(world, mode, cuda)[:2], "-m", "lowvram", *lowvram_args])
    print(f"Launching {world} processes ({mode}): {shown}", flush=True)
    proc = subprocess.Popen(cmd, env=env)
    # Ctrl-C is the launcher's to handle: it passes it to every worker, which saves a checkpoint and stops
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        signal.signal(signal.SIGINT, previous)


_ENV_HINT = "LOWVRAM_RESUME_HINT"


def _how_it_ended(exitcode: int) -> str:
    if exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else str(-exitcode)
        why = " (out of memory, or kill -9)" if name == "SIGKILL" else ""
        return f"was killed by {name}{why}"
    return f"exited with status {exitcode} (its error is printed above)"


def _launcher_main(argv: list[str]) -> int:
    """`python -m lowvram.launch LAUNCH_ARGS -m lowvram ...`: accelerate launch, and a short report if it fails.

    accelerate re-raises torchrun's ChildFailedError with two tracebacks of the launcher itself; the
    user needs which process failed, how, and how to go on.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    hint = os.environ.get(_ENV_HINT) or "lowvram run --resume RUN_DIR --gpus N"
    try:
        launch_command(args)
    except SignalException as e:  # Ctrl-C (or a kill): the workers had it too and saved where they could
        print(
            f"\ninterrupted ({e.sigval.name}): every process stopped. Resume with: {hint}", file=sys.stderr, flush=True
        )
        return EXIT_INTERRUPTED
    except ChildFailedError as e:
        rank, first = e.get_first_failure()  # the root cause; torchrun then stops the others (SIGTERM)
        if first.exitcode in (EXIT_USER_ERROR, EXIT_OUT_OF_MEMORY, EXIT_INTERRUPTED):
            return first.exitcode  # lowvram's own ending, explained by the process that met it
        print(
            f"error: a training process failed: process {rank} of {args.num_processes} "
            f"{_how_it_ended(first.exitcode)}; accelerate stopped the whole group.\n"
            f"Continue from the last checkpoint: {hint}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_CHECK_FAILED  # 1, as any crash ends (errors.py)
    return EXIT_OK


def launch_run(req: RunRequest) -> int | None:
    """`lowvram run ... --gpus N`: plan per card, choose the mode, then run the same command in N processes.

    The recipe and the run directory are found as the pipeline finds them (pipeline.open_run), so each
    process opens the same run. Returns None inside an already launched group (`accelerate launch -m lowvram
    run ...`): the caller then trains as one of its processes.
    """
    gpus = 1 if req.gpus is None else req.gpus
    if in_group():
        if gpus not in (1, world_size()):
            raise UserError(
                f"--gpus {gpus}, but this process was launched in a group of {world_size()}.",
                hint="Leave --gpus out under accelerate launch: its --num_processes decides.",
            )
        return None
    if gpus < 1:
        raise UserError(f"--gpus {gpus}: give a number of processes, 1 or more.")
    if gpus == 1:
        raise UserError(f"--strategy {req.strategy} shares the training between cards; it needs --gpus 2 or more.")
    cuda = _check_cards(gpus)
    run = open_run(req)
    plan = plan_per_card(run.recipe, training_device(req.vram, req.gpu), run.recipe_dir, gpus, req.strategy)
    if not cuda:
        print(f"No CUDA GPU: {gpus} processes on the CPU, connected by gloo (what the tests use).", flush=True)
    hint = shlex.join(["lowvram", "run", "--resume", str(run.dir), "--gpus", str(gpus)])
    return launch(gpus, plan.parallel, _child_args(req, run), cuda, hint)


def _check_cards(gpus: int) -> bool:
    """Whether the processes train on CUDA cards; refuses more processes than the machine has cards."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < gpus:
        raise UserError(
            f"--gpus {gpus}, but this machine has {torch.cuda.device_count()} CUDA device(s).",
            hint="Use --gpus with at most that many, or run on several machines (README: More than one GPU).",
        )
    return cuda


def _child_args(req: RunRequest, run: Run) -> list[str]:
    """The `lowvram` command each process runs: the same run, in the folder chosen here."""
    child = ["run", "--resume", str(run.dir)] if run.resumed else ["run", req.recipe or "", "--run-dir", str(run.dir)]
    child += list(req.overrides)
    child += [] if req.export else ["--no-export"]
    child += ["--vram", str(req.vram)] if req.vram else []
    child += ["--gpu", req.gpu] if req.gpu else []
    return child


if __name__ == "__main__":
    sys.exit(_launcher_main(sys.argv[1:]))
