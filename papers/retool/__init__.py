"""ReTool (Feng et al. 2025, "ReTool: Reinforcement Learning for Strategic Tool Use in LLMs"), at laptop scale:
two-digit multiplication with a calculator tool.

    paperloop run retool output_dir=runs/retool            # one seed: both SFT models, both RL runs, the table
    paperloop run retool output_dir=runs/retool seeds=[0,1,2]

For each seed, a tiny Llama is trained twice with SFTTrainer on the same pairs and budget: a cold-start model on
demonstrations of which a `tool_share` call the calculator (`<call>mul(a,b)</call>`, its result, then the answer)
and the rest answer directly, and a text-only model on direct answers alone. Then RLTrainer trains each with GRPO
and the same 0/1 outcome reward, the first with the tool in the loop (`ToolEnv`, up to `max_turns` actions an
episode), the second on single-turn text completions. Every model is scored on held-out pairs: greedy accuracy,
pass@1 from `eval_samples` samples, the share of answers that used the tool, mean turns. Writes results.json,
results.md and results.png (training accuracy and tool-call rate over RL steps) under output_dir; each stage's run
(checkpoints, TensorBoard, metrics.jsonl) has its own folder, and an interrupted command continues where it stopped.
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
from .task import (calculator_env, correct_text, make_tokenizer, rl_examples, sft_examples, split_problems,
                   stop_token_ids)

PAPER = ('Feng et al. 2025, "ReTool: Reinforcement Learning for Strategic Tool Use in LLMs" (RL with a code '
         'interpreter in the loop vs text-only RL), on two-digit multiplication with a calculator')


@dataclass(frozen=True)
class Config(RLConfig):
    """RLConfig's keys configure both RL runs; `max_turns` only the one with the tool (the other has one turn)."""

    seeds: Tuple[int, ...] = (0,)  # each seed: both SFT models and both RL runs
    hidden_size: int = 128
    num_layers: int = 2
    held_out: int = 200  # pairs kept out of SFT and RL, for the evaluation
    data_seed: int = 0
    tool_share: float = 0.2  # of the cold-start demonstrations, this share use the tool
    sft_steps: int = 300
    sft_batch_size: int = 64
    sft_lr: float = 1e-3
    eval_samples: int = 8  # sampled episodes per held-out pair at eval_temperature, for pass@1 and the tool rate
    num_threads: int = 1  # torch intra-op threads; 0: torch's default

    resume_may_change = RLConfig.resume_may_change + ("seeds", "eval_samples")

    def __post_init__(self):
        super().__post_init__()
        if not self.seeds or len(set(self.seeds)) < len(self.seeds):
            raise ConfigError(f"seeds: a non-empty list of distinct seeds, got {list(self.seeds)}")
        if not 0 < self.tool_share < 1:
            raise ConfigError(f"tool_share: must be in (0, 1) (some demonstrations with the tool, some without), got "
                              f"{self.tool_share}")
        if not 1 <= self.held_out < 8100:
            raise ConfigError(f"held_out: must be in [1, 8100), got {self.held_out}")
        for key in ("sft_steps", "sft_batch_size", "hidden_size", "num_layers", "eval_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_turns < 2:
            raise ConfigError(f"max_turns: the tool run needs >= 2 (a call, then the answer), got {self.max_turns}")


def run(cfg: Config) -> Path:
    out = output_folder(cfg.output_dir, cfg.num_threads)
    tokenizer = make_tokenizer()
    train, held_out = split_problems(cfg.held_out, cfg.data_seed)
    start, rows = time.perf_counter(), []
    for seed in cfg.seeds:
        folder = out / f"seed{seed}"
        for name, share, build_rl in (("tool", cfg.tool_share, tool_rl), ("text", 0.0, text_rl)):
            sft_folder, rl_folder = folder / f"sft_{name}", folder / f"rl_{name}"
            sft_model, sft_s = stage(sft_folder, lambda f: sft_trainer(cfg, tokenizer, train, share, seed, f),
                                     {**sft_settings(cfg), "seed": seed, "tool_share": share})
            rl_model, rl_s = stage(rl_folder, lambda f: build_rl(cfg, tokenizer, train, seed, f, sft_folder / "model"),
                                   {**settings(cfg), "seed": seed, "tool": name == "tool"})
            for stage_name, model, seconds in ((f"sft_{name}", sft_model, sft_s), (f"rl_{name}", rl_model, rl_s)):
                scores = evaluate(model, tokenizer, held_out, cfg.eval_samples, cfg.eval_temperature,
                                  cfg.max_new_tokens, cfg.max_turns, seed)
                rows.append({"model": stage_name, "seed": seed, **scores, "train_seconds": round(seconds, 1)})
                print(f"seed {seed} {stage_name:9s} greedy {100 * scores['greedy_acc']:5.1f}%  pass@1 "
                      f"{100 * scores['pass@1']:5.1f}%  tool calls {100 * scores['tool_rate']:5.1f}%", flush=True)
    write_results(out, PAPER, rows, {"held_out": cfg.held_out, "eval_samples": cfg.eval_samples,
                                     "eval_temperature": cfg.eval_temperature,
                                     "seconds": round(time.perf_counter() - start, 1), "settings": settings(cfg),
                                     "curves": curves(out, cfg.seeds)})
    return out


SFT_KEYS = ("hidden_size", "num_layers", "held_out", "data_seed", "sft_steps", "sft_batch_size", "sft_lr",
            "num_threads")
NOT_SETTINGS = ("output_dir", "log_every_steps", "checkpoint_every_steps", "time_limit_s", "val_every",
                "val_every_steps", "log_completions", "micro_batch_size", "seeds", "eval_samples",
                "eval_temperature", "eval_num_generations", "eval_pass_threshold", "seed", "tool_share")


def settings(cfg: Config) -> dict:
    """Every key that changes what an RL stage trains (not which seeds run, how they are scored, logged or saved)."""
    return stage_settings(cfg, NOT_SETTINGS)


def sft_settings(cfg: Config) -> dict:
    return {k: v for k, v in settings(cfg).items() if k in SFT_KEYS}


def sft_trainer(cfg: Config, tokenizer, pairs, tool_share: float, seed: int, folder: Path) -> SFTTrainer:
    """Cold-start SFT (completion-only cross-entropy): the demonstrations of `task.sft_examples`."""
    config = SFTConfig(max_length=40, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr, max_steps=cfg.sft_steps,
                       seed=seed, output_dir=str(folder), log_every_steps=cfg.log_every_steps,
                       checkpoint_every_steps=cfg.checkpoint_every_steps)
    model = tiny_causal_lm(len(tokenizer), cfg.hidden_size, cfg.num_layers, seed=seed)
    return SFTTrainer(model, config, tokenizer=tokenizer, train_data=sft_examples(pairs, tool_share, seed),
                      callbacks=[TensorBoardLogger(), ProgressBar()])


def rl_config(cfg: Config, seed: int, folder: Path, **changes) -> RLConfig:
    keys = {f.name for f in dataclasses.fields(RLConfig)}
    return RLConfig(**{**{k: v for k, v in dataclasses.asdict(cfg).items() if k in keys}, "seed": seed,
                       "output_dir": str(folder), **changes})


def tool_rl(cfg: Config, tokenizer, pairs, seed: int, folder: Path, sft_model: Path) -> RLTrainer:
    """GRPO with the calculator in the loop: episodes of a call (or not), the tool's result, the answer."""
    from transformers import AutoModelForCausalLM

    return RLTrainer(AutoModelForCausalLM.from_pretrained(sft_model), rl_config(cfg, seed, folder),
                     tokenizer=tokenizer, train_data=rl_examples(pairs), env=calculator_env(),
                     stop_token_ids=stop_token_ids(tokenizer), callbacks=[TensorBoardLogger(), ProgressBar()])


def text_rl(cfg: Config, tokenizer, pairs, seed: int, folder: Path, sft_model: Path) -> RLTrainer:
    """The same GRPO on single-turn text answers (no tool, one turn)."""
    from transformers import AutoModelForCausalLM

    return RLTrainer(AutoModelForCausalLM.from_pretrained(sft_model), rl_config(cfg, seed, folder, max_turns=1),
                     tokenizer=tokenizer, train_data=rl_examples(pairs), reward_fns=[correct_text],
                     stop_token_ids=stop_token_ids(tokenizer), callbacks=[TensorBoardLogger(), ProgressBar()])


def curves(out: Path, seeds) -> dict:
    """From each RL stage's metrics.jsonl: (step, training accuracy, tool-call rate) at each logged step."""
    found = {}
    for seed in seeds:
        for name in ("tool", "text"):
            path = out / f"seed{seed}" / f"rl_{name}" / "metrics.jsonl"
            if path.exists():
                lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                found[f"{name}_seed{seed}"] = [[line["step"], line.get("reward/mean"), line.get("env/used_tools")]
                                               for line in lines if "reward/mean" in line]
    return found
