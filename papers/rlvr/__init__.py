"""RL with verifiable rewards vs pass@k (Yue et al. 2025, "Does Reinforcement Learning Really Incentivize Reasoning
Capacity in LLMs Beyond the Base Model?"), on two-digit addition.

    paperloop run rlvr output_dir=runs/rlvr            # SFT, then GRPO and Dr. GRPO from it, pass@1..256
    paperloop run rlvr methods=[grpo] max_steps=300     # one RL method, shorter
    paperloop run rlvr output_dir=runs/rlvr_variants methods=[grpo,dapo,gspo,cispo] rl_seeds=[0,1,2] eval_samples=64

A tiny Llama (width 128, 4 layers) is first trained with SFTTrainer to partial competence on `a+b=` -> `c` (one
token per character), then trained from that same SFT checkpoint by RLTrainer with GRPO and with Dr. GRPO on a
0/1 correctness reward (or with the recipes chosen in `methods`: DAPO, GSPO, CISPO too, and GRPO with
asynchronous generation `max_lag` steps behind; once per seed of `rl_seeds`). Each model is scored on held-out
pairs that neither stage saw: n samples per prompt, pass@k by the unbiased estimator for k = 1, 2, 4, ..., n.
Writes results.json, results.md and results.png (the pass@k curves) under output_dir, with each stage's run
(checkpoints, TensorBoard) in its own folder. A stage interrupted by a signal checkpoints and the command stops;
the same command again continues it, and skips stages already done.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

from paperloop import ConfigError, RLConfig, RLTrainer, SFTConfig, SFTTrainer
from paperloop.callbacks import ProgressBar, TensorBoardLogger
from paperloop.models.lm import tiny_causal_lm

from ..stages import output_folder, stage, stage_settings
from .evaluate import evaluate, write_results
from .task import correct, make_tokenizer, rl_prompts, sft_examples, split_problems

PAPER = ('Yue et al. 2025, "Does Reinforcement Learning Really Incentivize Reasoning Capacity in LLMs Beyond the '
         'Base Model?" (pass@k of RLVR vs its starting model), on two-digit addition')
# Each RL method is a set of RLConfig keys: paperloop.rl's advantage normalization, loss aggregation, policy loss
# and DAPO's options. The three later recipes make 4 updates a rollout batch (minibatches of 4 prompts, as GSPO's
# paper does): their losses differ from GRPO's only off-policy, where the ratio is not 1.
METHODS = {"grpo": dict(advantage="group_std", aggregation="sequence_mean"),  # Shao et al. 2024
           "dr_grpo": dict(advantage="none", aggregation="constant"),  # Liu et al. 2025
           # GRPO with generation in a process of its own: step s samples from the weights after step s - max_lag
           "grpo_async": dict(advantage="group_std", aggregation="sequence_mean", async_generation=True),
           # Yu et al. 2025: token mean, clip-higher, dynamic sampling, soft overlong punishment (answers are at most
           # 4 tokens with EOS: the last 2 of the 6 are the buffer)
           "dapo": dict(advantage="group_std", aggregation="token_mean", clip_high=0.28, dynamic_sampling=True,
                        overlong_buffer=2, minibatch_size=4),
           # Zheng et al. 2025: sequence ratio, its narrow clip (3e-4 / 4e-4, §5.1), the sequence mean
           "gspo": dict(advantage="group_std", aggregation="sequence_mean", policy_loss="gspo", clip_low=3e-4,
                        clip_high=4e-4, minibatch_size=4),
           # MiniMax-M1 2025: clipped, detached importance weights; token mean; the weight capped at 1 + 4 (TRL's 5)
           "cispo": dict(advantage="group_std", aggregation="token_mean", policy_loss="cispo", clip_high=4.0,
                         minibatch_size=4)}


@dataclass(frozen=True)
class Config(RLConfig):
    """RLConfig's keys configure both RL runs (their advantage and aggregation come from `methods`)."""

    methods: Tuple[str, ...] = ("grpo", "dr_grpo")
    rl_seeds: Tuple[int, ...] = ()  # each RL method once per seed, from the same SFT model; (): once, with `seed`
    hidden_size: int = 128
    num_layers: int = 4
    held_out: int = 200  # pairs kept out of SFT and RL, for pass@k
    data_seed: int = 0
    sft_steps: int = 300
    sft_batch_size: int = 64
    sft_lr: float = 1e-3
    eval_samples: int = 256  # n per held-out prompt; pass@k for k = 1, 2, 4, ..., n
    eval_temperature: float = 1.0
    num_threads: int = 1  # torch intra-op threads; 0: torch's default

    # Which of the paper's runs to make (and how to score them) may change between invocations, not how each trains.
    resume_may_change = RLConfig.resume_may_change + ("methods", "rl_seeds", "eval_samples", "eval_temperature")

    def __post_init__(self):
        super().__post_init__()
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or len(set(self.methods)) < len(self.methods):
            raise ConfigError(f"methods: a non-empty list of distinct names from {sorted(METHODS)}, got "
                              f"{list(self.methods)}")
        if len(set(self.rl_seeds)) < len(self.rl_seeds):
            raise ConfigError(f"rl_seeds: distinct seeds, got {list(self.rl_seeds)}")
        if self.eval_samples < 1 or self.eval_samples & (self.eval_samples - 1):
            raise ConfigError(f"eval_samples: must be a power of 2, got {self.eval_samples}")
        if not 1 <= self.held_out < 8100:
            raise ConfigError(f"held_out: must be in [1, 8100), got {self.held_out}")
        for key in ("sft_steps", "sft_batch_size", "hidden_size", "num_layers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")


def run(cfg: Config) -> Path:
    for key in sorted({key for method in cfg.methods for key in METHODS[method]}):
        if getattr(cfg, key) != getattr(RLConfig, key):  # replaced per method: an override would be thrown away
            raise ConfigError(f"{key}: rlvr takes each RL method's {key} from `methods` ("
                              + ", ".join(f"{m}: {METHODS[m].get(key, getattr(RLConfig, key))}" for m in cfg.methods)
                              + "); choose the methods with methods=[...]")
    out = output_folder(cfg.output_dir, cfg.num_threads)
    tokenizer = make_tokenizer()
    train, held_out = split_problems(cfg.held_out, cfg.data_seed)
    start = time.perf_counter()
    models, seconds = {}, {}
    models["sft"], seconds["sft"] = stage(out / "sft", lambda folder: sft_trainer(cfg, tokenizer, train, folder),
                                          sft_settings(cfg))
    runs = {"sft": ("sft", cfg.seed)}  # stage folder -> (method, seed)
    for method in cfg.methods:
        for seed in cfg.rl_seeds or (cfg.seed,):
            name = method if seed == cfg.seed else f"{method}_seed{seed}"
            runs[name] = (method, seed)
            models[name], seconds[name] = stage(
                out / name, lambda folder: rl_trainer(cfg, tokenizer, train, method, folder, out / "sft" / "model",
                                                      seed),
                {**settings(cfg), "method": method, **({"seed": seed} if seed != cfg.seed else {})})
    rows = []
    for name, model in models.items():
        scores = evaluate(model, tokenizer, held_out, cfg.eval_samples, cfg.eval_temperature, cfg.max_new_tokens,
                          cfg.seed)
        record = json.loads((out / name / "stage.json").read_text())
        rows.append({"method": runs[name][0], "seed": runs[name][1], "stage": name, **scores,
                     "train_seconds": round(seconds[name], 1), "prompts_sampled": record.get("prompts_sampled")})
        shown = "  ".join(f"pass@{k} {100 * v:5.1f}%" for k, v in scores["pass_at"].items() if k in ("1", "16", "256"))
        print(f"{name:8s} greedy {100 * scores['greedy_acc']:5.1f}%  {shown}", flush=True)
    seconds["total"] = round(time.perf_counter() - start, 1)
    write_results(out, PAPER, rows, {"held_out": cfg.held_out, "eval_samples": cfg.eval_samples,
                                     "eval_temperature": cfg.eval_temperature, "seconds": seconds,
                                     "settings": settings(cfg), "methods": {m: METHODS[m] for m in cfg.methods}})
    return out


SFT_KEYS = ("hidden_size", "num_layers", "held_out", "data_seed", "sft_steps", "sft_batch_size", "sft_lr", "seed",
            "num_threads")


# Keys that change nothing a finished stage holds. Unlike a resume, a finished stage's length counts: a stage
# trained for 1 step is not the 600-step one (max_steps, max_epochs and early stopping stay settings).
NOT_SETTINGS = ("output_dir", "log_every_steps", "checkpoint_every_steps", "time_limit_s", "val_every",
                "val_every_steps", "log_completions", "micro_batch_size", "methods", "rl_seeds", "eval_samples",
                "eval_temperature", "eval_num_generations", "eval_pass_threshold")


def settings(cfg: Config) -> dict:
    """Every key that changes what a stage trains (not which stages run, how they are scored, logged or saved)."""
    return stage_settings(cfg, NOT_SETTINGS)


def sft_settings(cfg: Config) -> dict:
    return {k: v for k, v in settings(cfg).items() if k in SFT_KEYS}


def sft_trainer(cfg: Config, tokenizer, pairs, folder: Path):
    """SFT to partial competence: completion-only cross-entropy on `a+b=` -> `c` + EOS."""
    config = SFTConfig(max_length=16, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr, max_steps=cfg.sft_steps,
                       seed=cfg.seed, output_dir=str(folder), log_every_steps=cfg.log_every_steps,
                       checkpoint_every_steps=cfg.checkpoint_every_steps)
    model = tiny_causal_lm(len(tokenizer), cfg.hidden_size, cfg.num_layers, seed=cfg.seed)
    return SFTTrainer(model, config, tokenizer=tokenizer, train_data=sft_examples(pairs),
                      callbacks=[TensorBoardLogger(), ProgressBar()])


def rl_trainer(cfg: Config, tokenizer, pairs, method: str, folder: Path, sft_model: Path, seed: int) -> RLTrainer:
    """RL from the SFT checkpoint with the 0/1 correctness reward and the method's keys, seeded by `seed` (the data
    order and the sampling; the model is the SFT one whatever the seed)."""
    from transformers import AutoModelForCausalLM

    config = dataclasses.replace(cfg, output_dir=str(folder), seed=seed, **METHODS[method])
    return RLTrainer(AutoModelForCausalLM.from_pretrained(sft_model), config, tokenizer=tokenizer,
                     train_data=rl_prompts(pairs), reward_fns=[correct], callbacks=[TensorBoardLogger(), ProgressBar()])
