"""Asynchronous generation with a fixed lag: a process of its own plays the episodes of step s with the weights after
step s - k (`max_lag`), while the trainer trains on earlier ones.

    RLConfig(async_generation=True, max_lag=1)     # rollouts one step behind the weights being trained

The lag is fixed, not "whatever was ready": step s always samples from W_{max(s-k, 0)} (W_j: the weights after j
steps), so a run is a pure function of its config and seed whatever the timing — reproducible, and exactly
resumable. k = 0 runs the same machinery and waits for every update: bitwise the synchronous loop.

The protocol, parent (`AsyncGeneration`) and child (`generation_main`):
- The trainer keeps k + 1 copies of the policy's weights in shared memory (`WeightSlots`; W_j in slot j mod k+1).
  After training step s it publishes W_{s+1} and asks for step s+1+k, whose rollouts need exactly W_{s+1}: a
  request is sent only when the weights it needs exist, and a slot is overwritten only after the step that read it
  was trained.
- The child answers requests in order: it loads the slot, plays the step's episodes with its own copy of the model
  and the run's sampling generator (`Player.rollout`, the trainer's own rollout code), and returns the episodes with
  the generator's state after them. Environments and reward functions run there (they must be picklable:
  module-level functions and classes).
- A checkpoint holds the queue: every requested step whose weights would be gone after a resume (all but the last
  request) is awaited, and its finished episodes, their weights' version and the generator's state after them are
  saved; the data position is the one consumed. A resume restarts the child from that generator state and asks for
  the rest again: no prompt is skipped or trained twice. (A second `fit()` of the same trainer without a resume
  has no queue: its first steps sample from the weights it starts with, the lag growing back to k.)
- The child dies with the parent (PR_SET_PDEATHSIG, and a check of the parent's pid while it waits); an error in it
  (an environment, a reward function) is sent back and raised by the trainer; its death is an error naming its exit.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import os
import pickle
import queue
import signal
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from ..config import ConfigError
from .config import RLConfig
from .envs import PER_EPISODE, PER_TOKEN, Episodes
from .rollouts import Player

__all__ = ["AsyncGeneration", "WeightSlots", "check_async", "generation_main"]

POLL_SECONDS = 0.2  # how often a waiting side checks that the other is alive


class WeightSlots:
    """k + 1 copies of a model's state dict in shared memory: W_j in slot j mod (k + 1)."""

    def __init__(self, model: torch.nn.Module, lag: int):
        state = model.state_dict()
        self.slots = [{name: tensor.detach().to("cpu", copy=True).share_memory_() for name, tensor in state.items()}
                      for _ in range(lag + 1)]

    def publish(self, model: torch.nn.Module, version: int) -> None:
        slot = self.slots[version % len(self.slots)]
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                slot[name].copy_(tensor)

    def load(self, model: torch.nn.Module, version: int) -> None:
        model.load_state_dict(self.slots[version % len(self.slots)])


@dataclass(frozen=True)
class Spec:
    """What the generation process is started with."""

    model: torch.nn.Module  # its own copy of the policy, on the CPU (the weights come from the slots)
    device: str  # where it generates: the trainer's device
    slots: WeightSlots
    player: Player
    data: object  # train_data
    generator_state: torch.Tensor
    threads: int


def generation_main(spec: Spec, requests, results, parent_pid: int) -> None:
    """The generation process: answer each request (step, indices, version) with the step's episodes, in order, until
    a None request; any error is sent back."""
    try:
        _die_with_parent()
        torch.set_num_threads(spec.threads)
        model = spec.model.to(spec.device).eval()
        generator = torch.Generator(device=spec.device).set_state(spec.generator_state)
        waited = time.perf_counter()
        while (request := _get(requests, parent_pid)) is not None:
            step, indices, version = request
            idle = time.perf_counter() - waited
            spec.slots.load(model, version)
            examples = [spec.data[i] for i in indices]
            episodes, seconds = spec.player.rollout(functools.partial(spec.player.play, model), examples, indices,
                                                    step, generator)
            results.put({"step": step, "version": version, "indices": indices, "episodes": episodes_state(episodes),
                         "seconds": seconds, "idle_s": idle, "generator": generator.get_state()})
            waited = time.perf_counter()
    except BaseException as e:  # noqa: B036 - everything goes back to the trainer, which raises it
        results.put({"error": _picklable(e), "traceback": traceback.format_exc()})


class AsyncGeneration:
    """The trainer's side: starts the generation process, asks for steps k ahead, hands each step its episodes,
    publishes the weights after each step, and holds (and restores) the queue a checkpoint needs."""

    def __init__(self, lag: int, player: Player):
        self.lag, self.player, self.total_steps = lag, player, None  # total_steps: set by start()
        self.finished: dict[int, dict] = {}  # step -> the child's answer, not trained yet
        self.requested = 0  # the next step to ask for
        self.oldest = 0  # the first step of this start: the oldest weights version in the slots
        self.generator: torch.Generator | None = None  # the trainer's sampling stream: its state after each step taken
        self.process = self.requests = self.results = self.slots = self.lookahead = None
        self.answered = False  # has the process sent anything since it started

    # ---- the run ------------------------------------------------------------------------------

    def start(self, model: torch.nn.Module, data, plan, step: int, total_steps: int | None,
              generator: torch.Generator) -> None:
        """Start the child at loop step `step` of `total_steps` (weights W_step are `model`'s) on `data`, the data
        plan at its consumed position, `generator` the trainer's sampling stream (a synchronous run's; it is kept at
        the state after the last step taken, so a checkpoint saves it); ask for every step whose weights exist (up
        to `step` + k)."""
        self.generator, self.total_steps = generator, total_steps
        # the child draws on from the last step asked for: the queue's last (a resume), else the last one taken
        start_state = self.finished[max(self.finished)]["generator"] if self.finished else generator.get_state()
        context = torch.multiprocessing.get_context("spawn")
        self.requests, self.results = context.Queue(), context.Queue()
        self.slots = WeightSlots(model, self.lag)
        self.slots.publish(model, step)
        self.oldest = step  # the oldest weights there are: a step asked for now samples from W_step at the earliest
        self.lookahead = copy.deepcopy(plan)
        self.requested = step
        for _ in range(len(self.finished)):  # the queue's steps were asked for before the checkpoint
            self._next_indices()
            self.requested += 1
        spec = Spec(generation_copy(model), str(next(model.parameters()).device), self.slots, self.player, data,
                    start_state, torch.get_num_threads())
        self.answered = False
        self.process = context.Process(target=generation_main, args=(spec, self.requests, self.results, os.getpid()),
                                       daemon=True, name="paperloop-generation")
        try:
            self.process.start()  # pickles the spec: the model, the player (tokenizer, rewards, env), the data
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            self.process = None
            raise TypeError(f"async_generation: the generation process is started with a copy of the model, the "
                            f"tokenizer, the reward functions or environment factory and train_data, and one of "
                            f"them cannot be pickled: {e}") from e
        while self.requested <= step + self.lag:
            if not self._ask():
                break

    def take(self, step: int, indices: torch.Tensor) -> tuple[Episodes, dict]:
        """Step `step`'s episodes (waiting for the child if need be) and their timings: `async/lag`, the seconds the
        trainer waited, the seconds the child had waited for this request."""
        start = time.perf_counter()
        while step not in self.finished:
            self._receive()
        answer = self.finished.pop(step)
        self.generator.set_state(answer["generator"])  # where a synchronous run's stream would be now
        episodes = episodes_from_state(answer["episodes"])
        if answer["indices"] != indices.tolist():
            raise RuntimeError(f"async generation: step {step} was played on prompts {answer['indices'][:4]}..., the "
                               f"data plan gives {indices.tolist()[:4]}...: the plan and its lookahead disagree")
        return episodes, {"seconds": answer["seconds"], "async/lag": step - answer["version"],
                          "async/generation_wait_s": time.perf_counter() - start, "async/training_wait_s":
                          answer["idle_s"]}

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        """Step `step` is trained: publish W_{step+1} and ask for the step that needs it (step + 1 + k)."""
        self.slots.publish(model, step + 1)
        self._ask()

    def stop(self) -> None:
        """Stop the child (the end of `train()`, or its error): no process outlives the run. What it played and
        was not taken is dropped: a later `fit()` asks again from the trainer's state (a resume, from the
        checkpoint's queue)."""
        self.finished.clear()
        self.requested = 0  # nothing in flight: a checkpoint taken now holds no queue
        if self.process is None:
            return
        if self.process.is_alive():
            self.requests.put(None)
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self.process = None

    # ---- the checkpoint -----------------------------------------------------------------------

    def state_dict(self, step: int) -> dict:
        """At the boundary after `step` steps: wait for every asked-for step whose weights would not exist after a
        resume (all that need W_j, j < step), then the queue of finished, untrained steps and the sampler's state
        after the last of them (the trainer's stream, after the last step taken, is saved with the RNG state)."""
        needed = [s for s in range(step, self.requested) if max(s - self.lag, 0) < step]
        while not all(s in self.finished for s in needed):
            self._receive()
        return {"queue": [self.finished[s] for s in needed]}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's queue: the child restarts after its last step, from the sampler's state after it."""
        self.finished = {answer["step"]: answer for answer in state["queue"]}

    # ---- helpers ------------------------------------------------------------------------------

    def _ask(self) -> bool:
        """Ask for the next step (False past the run's last step)."""
        if self.total_steps is not None and self.requested >= self.total_steps:
            return False
        indices = self._next_indices()
        self.requests.put((self.requested, indices, max(self.requested - self.lag, self.oldest)))
        self.requested += 1
        return True

    def _next_indices(self) -> list[int]:
        plan = self.lookahead
        while plan.epoch_done():
            plan.start_epoch(plan.epoch + 1)
        indices = torch.cat(next(iter(plan.steps())).micro_batches).tolist()
        plan.advance()
        return indices

    def _receive(self) -> None:
        try:
            answer = self.results.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if not self.process.is_alive():
                code = self.process.exitcode
                why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                hint = "" if self.answered else (
                    " It died before its first answer: a script that starts a run must keep its training under `if "
                    "__name__ == '__main__':`, as the process is started by spawn, which imports that script again "
                    "(its output above says more).")
                raise RuntimeError(f"the generation process died ({why}) before step {min(self._awaited())} was "
                                   f"played; the run's checkpoints are intact: resume once the cause is fixed.{hint}"
                                   ) from None
            return
        if "error" in answer:
            raise answer["error"] from RuntimeError(f"in the generation process:\n{answer['traceback']}")
        self.finished[answer["step"]] = answer
        self.answered = True

    def _awaited(self) -> list[int]:
        return [s for s in range(self.requested) if s not in self.finished] or [self.requested]


def check_async(config: RLConfig, world_size: int, player: Player) -> AsyncGeneration | None:
    """The async generation of a run that asks for it (None otherwise), or an error naming what it cannot go with."""
    if not config.async_generation:
        return None
    if world_size > 1:
        raise ConfigError("async_generation: one process only for now (each DDP process would need a generation "
                          "process of its own, not built yet); run it in one process, or synchronously")
    if config.lora is not None:
        raise ConfigError("async_generation: not with lora yet (the generation process publishes whole weights)")
    try:
        pickle.dumps(player.source)
    except Exception as e:
        raise ValueError(f"async_generation: the reward functions or the environment factory must be picklable "
                         f"(module-level functions and classes) to reach the generation process: {e}") from e
    return AsyncGeneration(config.max_lag, player)


def generation_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The policy as the generation process gets it: a copy on the CPU without the module hooks of the trainer's
    process (instrumentation that belongs there, and often cannot be pickled)."""
    copied = copy.deepcopy(model).cpu()
    for module in copied.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
                      module._backward_pre_hooks, getattr(module, "_forward_hooks_with_kwargs", {}),
                      getattr(module, "_forward_pre_hooks_with_kwargs", {}),
                      getattr(module, "_forward_hooks_always_called", {})):
            hooks.clear()
    return copied


def episodes_state(episodes: Episodes) -> dict:
    """Episodes as a checkpointable dict (CPU tensors, JSON values)."""
    state = {name: getattr(episodes, name).cpu() for name in PER_TOKEN + PER_EPISODE}
    metrics = {key: [float(total), int(count)] for key, (total, count) in episodes.metrics.items()}
    return {**state, "first_N": list(episodes.first_N), "metrics": metrics, "group_size": episodes.group_size,
            "pad_id": episodes.pad_id, "env_s": episodes.env_s}


def episodes_from_state(state: dict) -> Episodes:
    fields = {name: state[name] for name in PER_TOKEN + PER_EPISODE}
    metrics = {key: (total, count) for key, (total, count) in state["metrics"].items()}
    return Episodes(**fields, first_N=list(state["first_N"]), metrics=metrics, group_size=state["group_size"],
                    pad_id=state["pad_id"], env_s=state["env_s"])


def _get(requests, parent_pid: int):
    """The next request; the child ends itself when its parent is gone."""
    while True:
        try:
            return requests.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if os.getppid() != parent_pid:
                os._exit(0)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (a SIGKILLed trainer leaves no generation process)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _picklable(error: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
