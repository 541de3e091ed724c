"""Rollouts and the training batch built from them: pure, except the data plan that feeds them.

    rollouts = trainer.rollout(indices)                  # G episodes of each example, played and scored
    batch = rollouts.batch(advantages_N)                 # the shared LM batch shape, plus advantages and
    micro_batches = split_rows(batch, rows=8)            #   the sampler's log-probs; cut to memory

Every rollout is an episode (`rl.envs.Episodes`): a prompt's completion is a one-turn episode (`rl.prompts`), a
multi-turn environment's transcript a longer one, and both become a batch through the one `rollout_batch`. A new
rollout feature (a sampling rule, per-token rewards, a teacher's score) goes into `play` and this batch once.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..plans import EpochPlan, Step
from .envs import PER_EPISODE, Episodes, check_replay, episode_seed, play
from .prompts import env_factory_name


@dataclass(frozen=True)
class Rollouts:
    """One process's rollout batch: P examples with G episodes each; example p's are rows p*G .. p*G+G-1."""

    examples: list  # as train_data holds them
    indices_P: torch.Tensor | None  # their indices in train_data (on the CPU), when they come from there
    episodes: Episodes
    rewards_N_F: torch.Tensor  # (N, F) float64: each reward part (a reward function's value; an environment's return)
    rewards_N: torch.Tensor  # (N,) Σ_f weight_f · reward_f
    generate_s: float  # seconds spent sampling (and tokenizing observations)
    score_s: float  # seconds spent in the environments (the reward functions, for prompts)

    @property
    def group_size(self) -> int:
        return self.episodes.group_size

    @property
    def lengths_N(self) -> torch.Tensor:
        """(N,) tokens each episode's policy sampled (a completion's length; an episode's actions together)."""
        return self.episodes.policy_tokens_N.to(self.rewards_N.device)

    @property
    def stopped_N(self) -> torch.Tensor:
        """(N,) bool: ended by the environment after an action that ended at a stop token (not cut by a budget)."""
        return self.episodes.stopped_N.to(self.rewards_N.device)

    def batch(self, advantages_N: torch.Tensor, trained_N: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return rollout_batch(self.episodes, advantages_N, trained_N)


@dataclass
class Player:
    """What plays a run's episodes, apart from the weights: the tokenizer, the episodes' source (`rl.prompts`), the
    sampling settings of the config, the stop and pad ids. The trainer plays through one; an async run's generation
    process through a copy (picklable: a source of module-level functions)."""

    tokenizer: object
    source: object
    config: object  # the RLConfig
    stop_token_ids: list[int]
    pad_id: int
    replay_checked: bool = False  # whether the first episodes played have been checked to replay (`check_replay`)

    def play(self, model, examples: list, seeds_N: list[int], names: list[str], group_size: int, *,
             temperature: float, top_p: float = 1.0, generator: torch.Generator | None = None) -> Episodes:
        """`group_size` episodes of each example with `model`, each in a fresh environment of its own (from a copy of
        the example: an environment that edits it must not edit train_data), reset with `seeds_N`; their reward
        parts read off the environments. The first call checks that an episode replays."""
        envs = []
        for n in range(len(seeds_N)):
            example, name = examples[n // group_size], names[n // group_size]
            try:
                envs.append(self.source.make(copy.deepcopy(example), name))
            except Exception as e:
                raise RuntimeError(f"env {env_factory_name(self.source.factory)} raised {type(e).__name__} building "
                                   f"the environment of {name}: {e}") from e
        config = getattr(model, "config", None)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        played = play(model, self.tokenizer, envs, seeds_N, [names[n // group_size] for n in range(len(seeds_N))],
                      group_size=group_size, max_turns=self.config.max_turns, max_new_tokens=self.config.max_new_tokens,
                      generator=generator or torch.Generator(next(model.parameters()).device), temperature=temperature,
                      top_p=top_p, stop_token_ids=self.stop_token_ids, pad_token_id=self.pad_id, max_positions=limit,
                      split_special_tokens=self.config.split_special_tokens)
        if not self.replay_checked:  # once a fit: are episodes pure functions of (example, seed, actions)?
            check_replay(self.source.make(copy.deepcopy(examples[0]), names[0]), seeds_N[0], names[0],
                         played.first_N[0])
            self.replay_checked = True
        return dataclasses.replace(played, rewards_N_F=self.source.parts(envs, played))

    def rollout(self, play_fn: Callable, examples: list, indices: list[int], step: int,
                generator: torch.Generator) -> tuple[Episodes, float]:
        """G episodes of each train example (at `indices` of train_data) for loop step `step`, each reset with its
        seed from (run seed, step, index, generation), played by `play_fn` (the trainer's `play`, which a subclass may
        override, or `play` of a model): the episodes and the seconds they took."""
        c, G = self.config, self.config.num_generations
        seeds = [episode_seed(c.seed, step, i, g) for i in indices for g in range(G)]
        start = time.perf_counter()
        episodes = play_fn(examples, seeds, [f"train example {i}" for i in indices], G, temperature=c.temperature,
                           top_p=c.top_p, generator=generator)
        return episodes, time.perf_counter() - start


def rollout_batch(episodes: Episodes, advantages_N: torch.Tensor,
                  trained_N: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """N episodes' transcripts (a prompt and its completion; a multi-turn transcript), right-padded, in `lm.data`'s
    batch shape plus the RL fields, on the advantages' device:

        input_ids, target_tokens, position_ids  (N, T)  as `lm.data.pad_batch` builds them
        weights            (N, T) float  1 where the policy sampled the target, else 0: the prompt, an
                                         environment's observations and the chat template's framing are never
                                         trained and never counted by a normalizer
        advantages         (N,)          one per episode
        sampling_logprobs  (N, T)        the sampler's log-prob of each policy target, 0 elsewhere

    `trained_N` (bool, default all): episodes that are trained; the others get weight 0 everywhere (DAPO's overlong
    filtering masks truncated ones so). Right padding needs no attention mask: padding comes after every real
    token of its row.
    """
    N = len(episodes)
    if advantages_N.shape != (N,) or not N:
        raise ValueError(f"{N} episodes do not match advantages of shape {tuple(advantages_N.shape)}")
    T = int(episodes.lengths_N.max()) - 1  # position i predicts token i + 1: a row of L tokens has L - 1
    tokens_N_L, device = episodes.tokens_N_T[:, :T + 1], advantages_N.device
    weights_N_T = episodes.policy_N_T[:, 1:T + 1].to(torch.float32)
    if trained_N is not None:
        weights_N_T *= trained_N.cpu().to(torch.float32)[:, None]
    positions_T = torch.arange(T)
    # a row's last token predicts nothing: it is no input (as `lm.data.pad_batch`'s rows, padding from there on)
    last_input_N1 = (episodes.lengths_N - 1)[:, None]
    return {"input_ids": tokens_N_L[:, :-1].masked_fill(positions_T >= last_input_N1, episodes.pad_id).to(device),
            "target_tokens": tokens_N_L[:, 1:].contiguous().to(device),
            "weights": weights_N_T.to(device), "position_ids": positions_T.repeat(N, 1).to(device),
            "advantages": advantages_N,
            "sampling_logprobs": episodes.logprobs_N_T[:, 1:T + 1].contiguous().to(device)}


def gather_episodes(episodes: Episodes, gather: Callable, pad_across_processes: Callable, gather_objects: Callable,
                    device: torch.device) -> Episodes:
    """Every process's episodes in rank order, moved as tensors (on `device`, per-token ones padded to the widest
    process's); the first observations (the rollout records' prompts) as objects. Metrics and time stay this
    process's. `gather`, `pad_across_processes`, `gather_objects`: the trainer's collectives."""
    widest = {"tokens_N_T": episodes.pad_id, "policy_N_T": False, "logprobs_N_T": 0.0}
    tensors = {name: gather(pad_across_processes(getattr(episodes, name).to(device), dim=1, pad_index=value)).cpu()
               for name, value in widest.items()}
    tensors.update({name: gather(getattr(episodes, name).to(device)).cpu() for name in PER_EPISODE})
    return dataclasses.replace(episodes, **tensors, first_N=gather_objects(list(episodes.first_N)))


def choose_groups(spread_K: torch.Tensor, wanted: int, world_size: int, rank: int) -> list[int]:
    """Dynamic sampling's choice among K drawn groups (every process's, in the order drawn): the first `wanted`
    groups with a spread of rewards, then tied ones in order when there are too few; dealt out to the processes in
    order. This process's groups."""
    order_K = torch.cat([torch.nonzero(spread_K).flatten(), torch.nonzero(~spread_K).flatten()])[:wanted]
    return order_K.chunk(world_size)[rank].tolist()


def split_rows(batch: dict[str, torch.Tensor], rows: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive slices of `rows` rows (the last may be shorter), each cut to its longest trained row: the
    columns after every row's last trained target are padding, and skipping them saves their compute. A slice
    without a trained token keeps one column: it still takes its (zero) part in the update."""
    weights_N_T = batch["weights"]
    positions_T = torch.arange(1, weights_N_T.shape[1] + 1, device=weights_N_T.device)
    ends_N = torch.where(weights_N_T != 0, positions_T, 0).amax(dim=1).tolist()  # one host transfer
    parts = []
    for start in range(0, weights_N_T.shape[0], rows):
        width = max(1, *ends_N[start:start + rows])  # a slice with nothing to train (all masked) still takes part
        parts.append({k: v[start:start + rows, :width] if v.ndim == 2 else v[start:start + rows]
                      for k, v in batch.items()})
    return parts


class WholeStepsPlan(EpochPlan):
    """The default data plan without the epoch's short last step: every step gives every process exactly
    `batch_size` prompts, so every process makes the same number of updates (DDP's all-reduces pair up).

    Dynamic sampling: a loop step may take the prompts of the plan's next steps too (`draw_extra`), on into the next
    epoch's (as verl's sampler does), so that a step trains tied groups only when `max_sample_rounds` is spent —
    leaving the next epoch at least one step of its own. Once the loop step is done, the position moves past every
    step it drew (an offset past the epoch's end is carried into the next epoch when it starts), so a checkpoint
    resumes after them all and a resumed run draws the same prompts again."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra = 0  # steps drawn beyond the current one by the loop step in progress
        self._next: tuple[int, list[torch.Tensor]] | None = None  # (epoch + 1, its steps), once drawn from

    def epoch_steps(self, epoch: int) -> list[torch.Tensor]:
        return [s for s in super().epoch_steps(epoch) if len(s) == self.samples_per_step]

    def steps_per_epoch(self) -> int:
        return self.num_samples // self.samples_per_step

    def make_step(self, step_indices: torch.Tensor) -> Step:
        self.extra = 0  # a loop step begins (one abandoned by an exception draws its extra prompts again)
        return super().make_step(step_indices)

    def draw_extra(self) -> torch.Tensor | None:
        """This process's prompts of the next undrawn step (this epoch's, then the next one's), or None when only
        the next epoch's last step is left."""
        index = self.offset + 1 + self.extra
        steps = self._steps_of(self.epoch)
        if index >= len(steps):
            if self._next is None or self._next[0] != self.epoch + 1:
                self._next = (self.epoch + 1, self.epoch_steps(self.epoch + 1))
            steps, index = self._next[1], index - len(steps)
            if index >= len(steps) - 1:
                return None
        self.extra += 1
        return torch.cat(self.split(steps[index]))

    def advance(self) -> None:
        self.offset += 1 + self.extra
        self.extra = 0

    def offset_limit(self, epoch: int) -> int:
        # A step's draws go on into the next epoch's steps but its last: every step of both epochs but that one taken
        return 2 * self.steps_per_epoch() - 1

    def start_epoch(self, epoch: int) -> None:
        carried = self.offset - len(self._steps_of(self.epoch)) if epoch == self.epoch + 1 else 0
        super().start_epoch(epoch)
        self.offset = max(carried, 0)  # the next epoch's steps a step of the last one drew
