"""More than one GPU: the same recipe in several processes, launched and connected by Hugging Face accelerate.

    lowvram run demo --gpus 2                          # accelerate launch --num_processes 2 ... -m lowvram run demo
    accelerate launch -m lowvram run demo              # the same, under your own `accelerate config`
    accelerate launch --num_machines 2 --machine_rank R --main_process_ip HOST -m lowvram run demo   # two nodes

lowvram writes no launcher and no collectives of its own: `--gpus N` runs accelerate's own
`accelerate launch` (torchrun underneath) and the TRL trainers inside use accelerate for DDP, FSDP
or DeepSpeed. This module adds what a lowvram run needs on top:
- the plan per card: each process gets its share of the global effective batch (accumulation
  divided across processes), DDP or FSDP chosen by whether one card holds the model, and a refusal
  with the reason where neither fits (`plan_per_card`);
- one writer: only the main process prints progress and writes files (`is_main`, `join`);
- the group ends together: every process dies with its launcher, and a failed process ends the
  group (torchrun stops the others) with one clear message (`launch`).
Without a GPU the processes run on CPU with the gloo backend: that is how the tests check it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from lowvram.errors import EXIT_CHECK_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_OUT_OF_MEMORY, EXIT_USER_ERROR, UserError

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed")

UNSLOTH_NOTE = (
    "several processes train with transformers+PEFT: Unsloth documents multi-GPU only as a manual "
    "DDP setup under `accelerate launch` (official support announced as coming) and has no FSDP "
    "sharding, so lowvram does not run it in a process group"
)


# ------------------------------------------------------------------ where this process stands


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
    import ctypes
    import signal

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
    # the terminal: a second Ctrl-C means "stop now" (lowvram.callbacks.graceful_interrupt)
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


# ------------------------------------------------------------------ the plan per card


def group_recipe(recipe, world: int):
    """(recipe, note): multi-process training uses the transformers+PEFT backend (see UNSLOTH_NOTE)."""
    if world <= 1:
        return recipe, None
    if recipe.model.backend == "unsloth":
        raise UserError(
            f"model.backend is 'unsloth', but {world} processes train with transformers+PEFT.",
            [UNSLOTH_NOTE],
            hint="Set model.backend=auto (or hf), or train on one card without --gpus.",
        )
    if recipe.model.backend == "hf":
        return recipe, None
    model = dataclasses.replace(recipe.model, backend="hf")
    return dataclasses.replace(recipe, model=model), UNSLOTH_NOTE


def split_batch(sp, world: int, min_batch: int = 1):
    """A stage's plan for one of `world` processes: the global effective batch kept, accumulation divided.

    The one-card plan's batch per step (batch_size x grad_accum) is the global target; each process
    keeps at most its one-card micro-batch (memory only goes down) and accumulates less.
    """
    target = sp.batch_size * sp.grad_accum
    batch = max(min_batch, min(sp.batch_size, target // world or 1))
    accum = max(1, round(target / (batch * world)))
    total = batch * accum * world
    why = (
        f"global effective batch {total} = {batch} per card x accumulation {accum} x {world} processes"
        f" (one card: {sp.batch_size} x {sp.grad_accum})"
    )
    if total != target:
        why = (
            f"global effective batch {total}, not the recipe's {target}: {target} does not split evenly over "
            f"{world} processes; {batch} per card x accumulation {accum} x {world}"
        )
    reasons = {**sp.reasons, "processes": why}
    return dataclasses.replace(sp, batch_size=batch, grad_accum=accum, reasons=reasons)


def _weights_gib(plan) -> float | None:
    """The base weights' share of a stage's estimate (what FSDP shards); None without an estimate."""
    sizes = [sp.estimate.weights_gib for sp in plan.stages.values() if sp.estimate is not None]
    return max(sizes) if sizes else None


_MODE_TEXT = {
    "ddp": "data parallel: each process trains a full copy of the model on its share of every batch",
    "deepspeed": (
        "DeepSpeed ZeRO-2: optimizer states and gradients sharded (LoRA keeps them small), "
        "so each card is planned like DDP"
    ),
}


def plan_per_card(recipe, device, recipe_dir: Path | None, world: int, strategy: str = "auto", launched: bool = False):
    """The plan for each of `world` processes, one card each; refuses, with the reason, what cannot fit.

    DDP holds the whole model on every card, so a card must fit the one-card plan (at its share of
    the batch). FSDP shards the base weights over the cards: each holds 1/world of them, so a model
    one card cannot hold may fit; `auto` chooses FSDP only then. DeepSpeed ZeRO is planned like DDP
    (ZeRO-2 shards optimizer states and gradients, which LoRA keeps small) and needs `deepspeed`.
    """
    from lowvram.lengths import plan_with_data

    if strategy not in STRATEGIES:
        raise UserError(f"Unknown parallel strategy {strategy!r}.", hint=f"Use one of: {', '.join(STRATEGIES)}.")
    recipe, backend_note = group_recipe(recipe, world)
    if world <= 1:
        return plan_with_data(recipe, device, recipe_dir)
    if strategy == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(
                "--strategy deepspeed needs the deepspeed package, which is not installed.",
                hint="pip install deepspeed  (or use --strategy ddp / fsdp, which need nothing more)",
            )
    mode = "ddp" if strategy == "auto" else strategy
    origin = (
        "as launched by accelerate"
        if launched
        else "one card holds the model"
        if strategy == "auto"
        else "set with --strategy"
    )
    why = f"{_MODE_TEXT.get(mode, '')} ({origin})"
    one_card_refusal = None
    if strategy != "fsdp":
        try:
            plan = plan_with_data(recipe, device, recipe_dir)
        except UserError as e:
            if strategy != "auto" or device.kind != "cuda":
                raise UserError(
                    f"{strategy.upper()} keeps the whole model on each card, and one card cannot hold it: {e.message}",
                    e.problems,
                    hint="Use FSDP, which shards the weights over the cards: --strategy fsdp "
                    "(under your own accelerate launch: --use_fsdp).",
                ) from None
            one_card_refusal = e
    card = device
    if strategy == "fsdp" or one_card_refusal is not None:
        plan, why, card = _fsdp_plan(recipe, device, recipe_dir, world, one_card_refusal)
        mode = "fsdp"
    floor = 2 if "dpo" in plan.stages and recipe.dpo.method == "kto" else 1
    split = {name: split_batch(sp, world, floor if name == "dpo" else 1) for name, sp in plan.stages.items()}
    plan = _at_card_batch(recipe, card, recipe_dir, plan, split)
    reasons = {**plan.reasons, "parallel": why}
    if backend_note:  # the recipe left the backend to lowvram: transformers+PEFT, and why
        reasons["backend"] = f"transformers+PEFT: {backend_note}"
    return dataclasses.replace(plan, reasons=reasons, processes=world, parallel=mode)


def _fsdp_plan(recipe, device, recipe_dir, world: int, refusal: UserError | None):
    """Plan with the other cards' share of the weights off this card's budget (FSDP full sharding)."""
    from lowvram.lengths import plan_with_data

    if device.kind != "cuda":
        raise UserError(
            "FSDP shards the model over GPUs, and this machine has no CUDA GPU.",
            [
                "accelerate does not apply FSDP to CPU processes: it would train with DDP instead "
                "(tests/test_distributed.py checks this)."
            ],
            hint="Use --strategy ddp (or auto) here; FSDP runs on a machine with CUDA GPUs.",
        )
    big = dataclasses.replace(
        device, total_vram_gib=device.total_vram_gib * 64, usable_vram_gib=device.usable_vram_gib * 64
    )
    try:
        weights = _weights_gib(plan_with_data(recipe, big, recipe_dir))
    except UserError:
        weights = None
    if weights is None:
        raise refusal or UserError("FSDP could not be planned: the model's size is unknown.")
    saved = weights * (world - 1) / world
    shard = dataclasses.replace(device, usable_vram_gib=device.usable_vram_gib + saved)
    try:
        plan = plan_with_data(recipe, shard, recipe_dir)
    except UserError as e:
        raise UserError(
            f"Even sharded over {world} cards (FSDP: {weights / world:.1f} of the {weights:.1f} GiB of "
            f"weights on each), one card cannot hold this training: {e.message}",
            e.problems,
            hint="Use more cards (--gpus), a smaller model, or a shorter max_seq_len.",
        ) from None
    why = (
        f"FSDP: one card cannot hold the model with DDP, so the {weights:.1f} GiB of base weights are sharded: "
        f"{weights / world:.2f} GiB on each of {world} cards; the memory table shows the whole weights and a "
        f"budget raised by the {saved:.2f} GiB held by the other cards"
    )
    return plan, why, shard


def _at_card_batch(recipe, card, recipe_dir, one_card, split: dict):
    """The plan again at each card's share of the batch: its memory estimate is then the card's own, checked
    against the card's budget; the one-card reasons for the sequence length and the batch are kept."""
    from lowvram.lengths import plan_with_data

    stage_cfgs = {
        name: dataclasses.replace(
            getattr(recipe, name), max_seq_len=sp.max_seq_len, batch_size=sp.batch_size, grad_accum=sp.grad_accum
        )
        for name, sp in split.items()
    }
    plan = plan_with_data(dataclasses.replace(recipe, **stage_cfgs), card, recipe_dir)
    stages = {}
    for name, sp in plan.stages.items():
        kept = {
            k: v for k, v in one_card.stages[name].reasons.items() if k in ("max_seq_len", "batch_size", "grad_accum")
        }
        stages[name] = dataclasses.replace(
            sp, reasons={**sp.reasons, **kept, "processes": split[name].reasons["processes"]}
        )
    return dataclasses.replace(plan, stages=stages)


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
    from lowvram.children import python_module_cmd

    cmd = python_module_cmd("lowvram.distributed", [*launch_args(world, mode, cuda), "-m", "lowvram", *lowvram_args])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), _ENV_HINT: resume_hint}
    shown = shlex.join(["accelerate", "launch", *launch_args(world, mode, cuda)[:2], "-m", "lowvram", *lowvram_args])
    print(f"Launching {world} processes ({mode}): {shown}", flush=True)
    import signal

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
        import signal

        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else str(-exitcode)
        why = " (out of memory, or kill -9)" if name == "SIGKILL" else ""
        return f"was killed by {name}{why}"
    return f"exited with status {exitcode} (its error is printed above)"


def _launcher_main(argv: list[str]) -> int:
    """`python -m lowvram.distributed LAUNCH_ARGS -m lowvram ...`: accelerate launch, and a short report if it fails.

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


def launch_run(args, recipe_name: str | None, overrides: list[str], training_device, new_run_dir) -> int | None:
    """`lowvram run ... --gpus N`: plan per card, choose the mode, then run the same command in N processes.

    `training_device()` is the card each process will train on, `new_run_dir(recipe)` names a new run
    (both from lowvram.pipeline, passed in by the command line). Returns None inside an already launched group (`accelerate launch -m lowvram run ...`): the
    caller then trains as one of its processes.
    """
    gpus = 1 if args.gpus is None else args.gpus
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
        raise UserError(f"--strategy {args.strategy} shares the training between cards; it needs --gpus 2 or more.")
    import torch

    cuda = torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < gpus:
        raise UserError(
            f"--gpus {gpus}, but this machine has {torch.cuda.device_count()} CUDA device(s).",
            hint="Use --gpus with at most that many, or run on several machines (README: More than one GPU).",
        )
    from lowvram.recipe import apply_overrides, load_recipe, parse_recipe, read_recipe_file

    if args.resume:
        rdir = Path(args.resume)
        if not (rdir / "recipe.yaml").is_file():
            raise UserError(
                f"{rdir} is not a lowvram run directory (no recipe.yaml).",
                hint="Pass the folder 'lowvram run' created, e.g. runs/demo-20261122-101500.",
            )
        recipe = parse_recipe(
            apply_overrides(read_recipe_file(rdir / "recipe.yaml"), overrides), source=str(rdir / "recipe.yaml")
        )
        recipe_dir, child = None, ["run", "--resume", str(rdir)]
    else:
        if not recipe_name:
            raise UserError("Name a recipe to run.", hint="lowvram run demo --gpus 2")
        recipe, path = load_recipe(recipe_name, overrides)
        recipe_dir = path.parent
        rdir = Path(args.run_dir) if args.run_dir else new_run_dir(recipe)
        child = ["run", recipe_name, "--run-dir", str(rdir)]
    device = training_device()
    plan = plan_per_card(recipe, device, recipe_dir, gpus, args.strategy)
    if not cuda:
        print(f"No CUDA GPU: {gpus} processes on the CPU, connected by gloo (what the tests use).", flush=True)
    child += list(overrides)
    child += ["--no-export"] if args.no_export else []
    child += ["--vram", str(args.vram)] if args.vram else []
    child += ["--gpu", args.gpu] if args.gpu else []
    hint = shlex.join(["lowvram", "run", "--resume", str(rdir), "--gpus", str(gpus)])
    return launch(gpus, plan.parallel, child, cuda, hint)


if __name__ == "__main__":
    sys.exit(_launcher_main(sys.argv[1:]))
