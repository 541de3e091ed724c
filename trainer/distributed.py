"""Processes: Accelerate set up once (DDP), and FSDP2 (`strategy="fsdp"`); the quirks of both live here and nowhere
else."""

from __future__ import annotations

import atexit
import contextlib
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


# ---------------------------------------------------------------------------------------------
# FSDP (strategy="fsdp"): PyTorch's FSDP2, applied here rather than by Accelerate, whose FSDP path needs CUDA. The
# checkpoint format is the one every other run writes: full state dicts, the optimizer's numbered by parameter.


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """`fully_shard` each decoder layer (the classes the model's `_no_split_modules` names), then the root, in
    place. The root keeps its parameters unsharded from its forward to its backward (`reshard_after_forward=False`):
    the output layer runs after the forward, in chunks (`lm.losses.chunked_scores`), on its whole weight. Tied
    embeddings stay in the root's group (FSDP refuses a parameter in two groups)."""
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"strategy='fsdp': {type(model).__name__} names no decoder-layer class in _no_split_modules "
                         f"({sorted(names)}), so there is nothing to shard layer by layer; use strategy='ddp'")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model, reshard_after_forward=False)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_sync(accelerator: Accelerator, model: torch.nn.Module):
    """No gradient reduction in this backward (every micro-batch of an update but the last). Accelerate's
    `no_sync` does nothing for an FSDP2 module (it syncs every micro-batch: correct, and slower)."""
    if not is_sharded(model):
        with accelerator.no_sync(model):
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(the model's full state dict, the optimizer's in torch's plain format) gathered to CPU memory on the main
    process; other processes get empty dicts. A collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    return model_state, numbered(model, optimizer, optimizer_state) if optimizer_state else {}


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
                    optimizer_state: dict | None) -> None:
    """Put full state dicts (every process read them from the checkpoint) into the sharded model and its
    optimizer: each process keeps its own shard, with no communication. Tied weights are stored once; the alias a
    checkpoint leaves out is taken from the one it holds. Raises ValueError saying what does not fit."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    model_state = with_tied_aliases(model, model_state)
    expected = set(model.state_dict())
    if set(model_state) != expected:
        raise ValueError(f"weights do not fit the model (missing {sorted(expected - set(model_state))[:5]}, "
                         f"unexpected {sorted(set(model_state) - expected)[:5]})")
    options = StateDictOptions(full_state_dict=True)
    try:
        set_model_state_dict(model, model_state, options=options)
    except RuntimeError as e:  # a shape that does not fit
        raise ValueError(f"weights do not fit the model ({e})") from None
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, named(model, optimizer, optimizer_state), options=options)


def with_tied_aliases(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` plus, for each tied parameter stored under one of its names only, its other names."""
    names_of: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    out = dict(tensors)
    for names in names_of.values():
        present = [n for n in names if n in tensors]
        for name in names:
            if name not in out and present:
                out[name] = tensors[present[0]]
    return out


def _parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter the optimizer holds, in the order a plain `state_dict()` numbers them (0, 1, ...
    through its param_groups); a tied parameter by its first name, as `named_parameters` and DCP give it."""
    name_of: dict[int, str] = {}
    for name, parameter in model.named_parameters():
        name_of.setdefault(id(parameter), name)
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def numbered(model, optimizer, state: dict) -> dict:
    """An optimizer state dict keyed by parameter name (DCP's) -> torch's plain one, keyed by number."""
    index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    return {"state": {index[name]: s for name, s in state["state"].items()},
            "param_groups": [dict(g, params=[index[name] for name in g["params"]]) for g in state["param_groups"]]}


def named(model, optimizer, state: dict) -> dict:
    """torch's plain optimizer state dict (keyed by number) -> DCP's, keyed by parameter name."""
    names = _parameter_names(model, optimizer)
    if len(names) != sum(len(g["params"]) for g in state["param_groups"]):
        raise ValueError(f"optimizer: the checkpoint's has {sum(len(g['params']) for g in state['param_groups'])} "
                         f"parameters, this model's {len(names)}")
    return {"state": {names[int(i)]: s for i, s in state["state"].items()},
            "param_groups": [dict(g, params=[names[int(i)] for i in g["params"]]) for g in state["param_groups"]]}


def total_norm(tensors) -> torch.Tensor:
    """A norm that `clip_grad_norm_`/`get_total_norm` returned, as a plain tensor (a DTensor under FSDP)."""
    return tensors.full_tensor() if hasattr(tensors, "full_tensor") else tensors
