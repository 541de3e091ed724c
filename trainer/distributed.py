"""Accelerate, set up once: the quirks of using it from a trainer live here and nowhere else."""

from __future__ import annotations

import atexit
import gc
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

# Where Accelerate's optimizer wrapper does nothing that the trainer needs.
PLAIN_OPTIMIZER = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def make_accelerator() -> Accelerator:
    """The Accelerator for a trainer: devices, DDP (gloo on CPUs, NCCL on GPUs), process groups.

    Mixed precision is not Accelerate's here: the trainer runs `torch.autocast` itself around the
    forward. Accelerate keeps one process-wide state that refuses a second precision, so a process
    that builds trainers of both kinds (a sweep, the tests) could otherwise only go on by resetting
    Accelerate's private state; and an `accelerate launch --mixed_precision` must not silently
    override the config's `precision`.
    """
    # Accelerate runs several processes on CPUs (gloo) only when told cpu=True; without a GPU, a
    # torchrun/accelerate launch of several processes means exactly that.
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision="no", cpu=cpu_processes)
    if accelerator.num_processes > 1:
        # A process group left to interpreter teardown can abort the process ("terminate called
        # without an active exception") after a run that succeeded; close it in order at exit.
        atexit.unregister(_destroy_process_group)  # registered once, however many trainers
        atexit.register(_destroy_process_group)
    return accelerator


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        # Wait for every process first: one that tears down while a peer still talks to it (gloo)
        # makes the peer abort at exit.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        # Trainers live in reference cycles (callbacks hold them), and with them DDP's reducer, which keeps
        # the gloo process group and its threads alive. Left to interpreter teardown, the group is destroyed
        # with the interpreter half gone, and one process in ~10 aborted at exit under load; collect now.
        gc.collect()


def prepare_optimizer(accelerator: Accelerator, optimizer: torch.optim.Optimizer):
    """The optimizer as the trainer should step it. Accelerate's wrapper does nothing for one process
    or DDP, yet costs ~0.1 ms a step (it probes for an optional package in every step()): wrap
    only where it does work (DeepSpeed, FSDP, XLA)."""
    if accelerator.distributed_type in PLAIN_OPTIMIZER:
        return optimizer
    return accelerator.prepare_optimizer(optimizer)


def backward_fn(accelerator: Accelerator):
    """How the trainer runs backward. Accelerate's `backward` matters only for DeepSpeed, Megatron and a
    grad scaler; elsewhere it divides every loss by 1 and calls `loss.backward()`: call that directly."""
    if accelerator.distributed_type in PLAIN_OPTIMIZER and accelerator.scaler is None:
        return torch.Tensor.backward
    return accelerator.backward
