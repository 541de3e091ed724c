"""DPO (Rafailov et al. 2023, "Direct Preference Optimization"), Figure 2 (left): the reward-KL frontier of DPO, IPO
and RL with a KL penalty, on controlled "sentiment" generation with a known reward.

    paperloop run dpo output_dir=runs/dpo                  # one seed: SFT, pairs, reward model, every run, the figure
    paperloop run dpo output_dir=runs/dpo seeds=[0,1,2]    # the README's table

A tiny Llama is trained with SFTTrainer on synthetic movie reviews (`task`): the SFT model, which is also the
reference. For each seed: preference pairs are sampled from it (two completions of a review's opening) and labelled
by the true reward, a sentiment score of the whole review; a reward model (RewardTrainer, from the SFT body) learns
them; then from the SFT model DPOTrainer trains DPO at each β of `dpo_betas` and IPO at each τ of `ipo_taus` on the
pairs, and RLTrainer trains GRPO with a KL penalty at each β of `grpo_betas`, once with the true reward and once with
the learned reward model (`RewardModelScorer`). Each model is scored on held-out openings: its mean true reward and
its sequence-level KL(π ‖ π_ref) from samples (`evaluate`). Writes results.json, results.md and results.png (reward
vs KL, one point per method, setting and seed) under output_dir; each stage's run has its own folder, and an
interrupted command continues where it stopped, loading the stages already done.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

from paperloop import ConfigError, RLConfig, RLTrainer, SFTConfig, SFTTrainer
from paperloop.callbacks import Callback, ProgressBar, TensorBoardLogger
from paperloop.models.lm import tiny_causal_lm
from paperloop.preference import DPOConfig, DPOTrainer, RewardConfig, RewardModelScorer, RewardTrainer

from ..stages import data_stage, output_folder, stage, stage_settings
from .evaluate import evaluate, preference_pairs, write_results
from .task import COMPLETION_WORDS, PROMPT_WORDS, make_tokenizer, prompts, sentiment, sft_examples

PAPER = ('Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model", '
         'Figure 2 (left): reward vs KL on controlled sentiment generation, at laptop scale')

# Seeds of the prompt streams, offset by the run's seed (the evaluation's openings are the same for every seed).
PAIR_PROMPTS_SEED, RL_PROMPTS_SEED, EVAL_PROMPTS_SEED = 1_000, 2_000, 999_999


@dataclass(frozen=True)
class Config(RLConfig):
    """RLConfig's keys configure the GRPO runs (their `beta` comes from `grpo_betas`); the rest are the paper's."""

    seeds: Tuple[int, ...] = (0,)  # each seed: its pairs, reward model and every run, from the one SFT model
    hidden_size: int = 64
    num_layers: int = 2
    data_seed: int = 0  # the SFT reviews
    sft_reviews: int = 20_000
    sft_steps: int = 300
    sft_batch_size: int = 64
    sft_lr: float = 1e-3
    pair_prompts: int = 2_000  # openings sampled twice each for the preference pairs (ties left out)
    dpo_betas: Tuple[float, ...] = (0.1, 1.0, 3.0, 10.0)
    ipo_taus: Tuple[float, ...] = (0.5, 2.0)
    dpo_steps: int = 100
    dpo_batch_size: int = 32
    dpo_lr: float = 1e-3
    rm_steps: int = 150
    rm_batch_size: int = 32
    rm_lr: float = 1e-3
    grpo_betas: Tuple[float, ...] = (0.1, 0.3, 1.0)  # the KL penalty's weight (RLConfig's beta) of each GRPO run
    rl_prompts: int = 4_000
    eval_prompts: int = 256  # held-out openings
    eval_samples: int = 4  # completions of each, for the mean reward and the KL
    num_threads: int = 1  # torch intra-op threads; 0: torch's default

    resume_may_change = RLConfig.resume_may_change + ("seeds", "dpo_betas", "ipo_taus", "grpo_betas", "eval_prompts",
                                                      "eval_samples")

    def __post_init__(self):
        super().__post_init__()
        if not self.seeds or len(set(self.seeds)) < len(self.seeds):
            raise ConfigError(f"seeds: a non-empty list of distinct seeds, got {list(self.seeds)}")
        for key in ("dpo_betas", "ipo_taus", "grpo_betas"):
            values = getattr(self, key)
            if len(set(values)) < len(values) or any(not v > 0 for v in values):
                raise ConfigError(f"{key}: distinct numbers > 0 (or an empty list), got {list(values)}")
        for key in ("hidden_size", "num_layers", "sft_reviews", "sft_steps", "sft_batch_size", "pair_prompts",
                    "dpo_steps", "dpo_batch_size", "rm_steps", "rm_batch_size", "rl_prompts", "eval_prompts"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.eval_samples < 2:
            raise ConfigError(f"eval_samples: must be >= 2 (the KL's standard error), got {self.eval_samples}")
        if self.max_new_tokens <= COMPLETION_WORDS:
            raise ConfigError(f"max_new_tokens: a completion is {COMPLETION_WORDS} words and EOS, so at least "
                              f"{COMPLETION_WORDS + 1}; got {self.max_new_tokens}")


def run(cfg: Config) -> Path:
    if cfg.beta != RLConfig.beta:  # replaced per GRPO run: an override would be thrown away
        raise ConfigError(f"beta: dpo takes each GRPO run's KL weight from grpo_betas ({list(cfg.grpo_betas)}); "
                          "choose them with grpo_betas=[...]")
    out = output_folder(cfg.output_dir, cfg.num_threads)
    tokenizer = make_tokenizer()
    start, rows = time.perf_counter(), []
    reference, sft_seconds = stage(out / "sft", lambda folder: sft_trainer(cfg, tokenizer, folder), sft_settings(cfg))
    held_out = prompts(cfg.eval_prompts, EVAL_PROMPTS_SEED)

    def score(method: str, setting, seed: int, model, seconds: float) -> None:
        scores = evaluate(model, reference, tokenizer, held_out, cfg.eval_samples, cfg.max_new_tokens, seed)
        rows.append({"method": method, "setting": setting, "seed": seed, **scores, "train_seconds": round(seconds, 1)})
        print(f"seed {seed} {method:9s} {str(setting):5s} reward {scores['reward']:.3f}  KL {scores['kl']:6.2f}",
              flush=True)

    extras = {}
    for seed in cfg.seeds:
        folder = out / f"seed{seed}"
        score("sft", "-", seed, reference, sft_seconds)
        pairs = pair_stage(folder / "pairs.json", cfg, reference, tokenizer, seed)
        rm, _ = stage(folder / "reward_model", lambda f: reward_trainer(cfg, tokenizer, pairs, seed, f),
                      {**sft_settings(cfg), **pair_settings(cfg), "rm": rm_settings(cfg), "seed": seed},
                      model_class=_sequence_classifier())
        extras[f"seed{seed}"] = {"pairs": len(pairs), "reward_model_val_accuracy": rm_accuracy(folder / "reward_model")}
        sft_model = out / "sft" / "model"
        for loss, values in (("dpo", cfg.dpo_betas), ("ipo", cfg.ipo_taus)):
            for beta in values:
                model, seconds = stage(folder / f"{loss}_{beta:g}",
                                       lambda f: dpo_trainer(cfg, tokenizer, pairs, loss, beta, seed, f, sft_model),
                                       {**dpo_settings(cfg), "loss": loss, "beta": beta, "seed": seed})
                score(loss, beta, seed, model, seconds)
        for reward in ("true", "rm"):
            for beta in cfg.grpo_betas:
                model, seconds = stage(folder / f"grpo_{reward}_{beta:g}",
                                       lambda f: grpo_trainer(cfg, tokenizer, reward, rm, beta, seed, f, sft_model),
                                       {**settings(cfg), "reward": reward, "beta": beta, "seed": seed})
                score(f"grpo_{reward}", beta, seed, model, seconds)
    write_results(out, PAPER, rows, {"eval_prompts": cfg.eval_prompts, "eval_samples": cfg.eval_samples,
                                     "seconds": {"total": round(time.perf_counter() - start, 1)},
                                     "per_seed": extras, "settings": settings(cfg)})
    return out


# ---- settings: what a finished stage was trained with -------------------------------------------------------------

SFT_KEYS = ("hidden_size", "num_layers", "data_seed", "sft_reviews", "sft_steps", "sft_batch_size", "sft_lr",
            "num_threads")
PAIR_KEYS = ("pair_prompts", "max_new_tokens")
DPO_KEYS = ("dpo_steps", "dpo_batch_size", "dpo_lr")
RM_KEYS = ("rm_steps", "rm_batch_size", "rm_lr")
NOT_SETTINGS = ("output_dir", "log_every_steps", "checkpoint_every_steps", "time_limit_s", "val_every",
                "val_every_steps", "log_completions", "micro_batch_size", "seeds", "eval_prompts", "eval_samples",
                "eval_temperature", "eval_num_generations", "eval_pass_threshold", "dpo_betas", "ipo_taus",
                "grpo_betas", "seed", "beta")


def settings(cfg: Config) -> dict:
    """Every key that changes what a stage trains (not which runs are made, how they are scored, logged or saved)."""
    return stage_settings(cfg, NOT_SETTINGS)


def sft_settings(cfg: Config) -> dict:
    return {k: v for k, v in settings(cfg).items() if k in SFT_KEYS}


def pair_settings(cfg: Config) -> dict:
    return {k: v for k, v in settings(cfg).items() if k in PAIR_KEYS}


def rm_settings(cfg: Config) -> dict:
    return {k: v for k, v in settings(cfg).items() if k in RM_KEYS}


def dpo_settings(cfg: Config) -> dict:
    return {**sft_settings(cfg), **pair_settings(cfg), **{k: v for k, v in settings(cfg).items() if k in DPO_KEYS}}


# ---- the stages ---------------------------------------------------------------------------------------------------

def sft_trainer(cfg: Config, tokenizer, folder: Path) -> SFTTrainer:
    """SFT on whole reviews (completion-only cross-entropy on the words after the opening): the reference."""
    config = SFTConfig(max_length=PROMPT_WORDS + COMPLETION_WORDS + 2, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr,
                       max_steps=cfg.sft_steps, seed=cfg.data_seed, output_dir=str(folder),
                       log_every_steps=cfg.log_every_steps, checkpoint_every_steps=cfg.checkpoint_every_steps)
    model = tiny_causal_lm(len(tokenizer), cfg.hidden_size, cfg.num_layers, seed=cfg.data_seed)
    return SFTTrainer(model, config, tokenizer=tokenizer, train_data=sft_examples(cfg.sft_reviews, cfg.data_seed),
                      callbacks=[TensorBoardLogger(), ProgressBar()])


def pair_stage(path: Path, cfg: Config, reference, tokenizer, seed: int) -> list[dict]:
    """The seed's preference pairs: sampled from the SFT model and labelled once, then read back (a file written
    with other settings is refused, naming the key)."""
    wanted = {**sft_settings(cfg), **pair_settings(cfg), "seed": seed}

    def draw() -> list[dict]:
        opening = prompts(cfg.pair_prompts, PAIR_PROMPTS_SEED + seed)
        pairs = preference_pairs(reference, tokenizer, opening, cfg.max_new_tokens, seed)
        if not pairs:
            raise ValueError(f"pair_prompts={cfg.pair_prompts}: every prompt's two completions tied; sample more")
        return pairs

    return data_stage(path, wanted, draw, "pairs", "pairs")


def _sequence_classifier():
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification


def reward_trainer(cfg: Config, tokenizer, pairs: list[dict], seed: int, folder: Path) -> RewardTrainer:
    """A Bradley-Terry reward model from the SFT model's body and a fresh scalar head; a tenth of the pairs held out
    (its validation accuracy is reported)."""
    model = _sequence_classifier().from_pretrained(folder.parent.parent / "sft" / "model", num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    held = max(1, len(pairs) // 10)
    config = RewardConfig(max_length=PROMPT_WORDS + COMPLETION_WORDS + 2, batch_size=cfg.rm_batch_size, lr=cfg.rm_lr,
                          max_steps=cfg.rm_steps, seed=seed, output_dir=str(folder), val_every=0,
                          log_every_steps=cfg.log_every_steps, checkpoint_every_steps=cfg.checkpoint_every_steps)
    return RewardTrainer(model, config, tokenizer=tokenizer, train_data=pairs[held:], val_data=pairs[:held],
                         callbacks=[TensorBoardLogger(), ProgressBar(), RecordAccuracy()])


def rm_accuracy(folder: Path) -> float | None:
    path = folder / "val.json"
    return json.loads(path.read_text())["val/rewards/accuracies"] if path.exists() else None


class RecordAccuracy(Callback):
    """At the end of the reward model's training: its accuracy on the held-out pairs, written to val.json."""

    def on_train_end(self, trainer):
        if trainer.state.global_step >= trainer.config.max_steps and not trainer.state.interrupted:
            metrics = {k: float(v) for k, v in trainer.validate().items()}
            (Path(trainer.config.output_dir) / "val.json").write_text(json.dumps(metrics, indent=1) + "\n")


def dpo_trainer(cfg: Config, tokenizer, pairs: list[dict], loss: str, beta: float, seed: int, folder: Path,
                sft_model: Path) -> DPOTrainer:
    """DPO (`sigmoid`) or IPO (`ipo`, length-normalized as TRL) from the SFT model, the reference its frozen copy."""
    from transformers import AutoModelForCausalLM

    config = DPOConfig(loss=("sigmoid" if loss == "dpo" else "ipo",), beta=beta,
                       max_length=PROMPT_WORDS + COMPLETION_WORDS + 2, batch_size=cfg.dpo_batch_size, lr=cfg.dpo_lr,
                       max_steps=cfg.dpo_steps, seed=seed, output_dir=str(folder),
                       log_every_steps=cfg.log_every_steps, checkpoint_every_steps=cfg.checkpoint_every_steps)
    return DPOTrainer(AutoModelForCausalLM.from_pretrained(sft_model), config, tokenizer=tokenizer, train_data=pairs,
                      callbacks=[TensorBoardLogger(), ProgressBar()])


def grpo_trainer(cfg: Config, tokenizer, reward: str, reward_model, beta: float, seed: int, folder: Path,
                 sft_model: Path) -> RLTrainer:
    """GRPO with the k3 KL penalty `beta` to the SFT model, rewarded by the true reward or the learned model."""
    from transformers import AutoModelForCausalLM

    keys = {f.name for f in dataclasses.fields(RLConfig)}
    config = RLConfig(**{**{k: v for k, v in dataclasses.asdict(cfg).items() if k in keys}, "seed": seed,
                         "beta": beta, "output_dir": str(folder)})
    scorer = sentiment if reward == "true" else RewardModelScorer(reward_model, tokenizer, name="reward_model")
    train = [{"prompt": p} for p in prompts(cfg.rl_prompts, RL_PROMPTS_SEED + seed)]
    return RLTrainer(AutoModelForCausalLM.from_pretrained(sft_model), config, tokenizer=tokenizer, train_data=train,
                     reward_fns=[scorer], callbacks=[TensorBoardLogger(), ProgressBar()])
