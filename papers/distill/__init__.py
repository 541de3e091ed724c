"""On-policy distillation (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", GKD), on two-digit addition: a small student learns from a larger teacher on its own
samples, against students trained on fixed data with the same number of steps.

    paperloop run distill output_dir=runs/distill                 # one seed: teacher, student start, 8 methods
    paperloop run distill output_dir=runs/distill seeds=[0,1,2]    # the README's table (reuses the first three stages)

The teacher is rlvr's recipe (a tiny Llama of width 128 and 4 layers: SFTTrainer, then GRPO with RLTrainer); the
student (width 64, 2 layers) is trained by SFTTrainer for a few steps to partial competence, and every method starts
from that one checkpoint, for `max_steps` optimizer steps of `batch_size x num_generations` completions each:
`sft` (SFTTrainer on the ground-truth sums), `seqkd` (SFTTrainer on the teacher's completions of the training
prompts, drawn once), `supervised_kd` (SFTTrainer with `teacher=`: forward KL to the teacher on the ground-truth
completions), `gkd_reverse_kl`, `gkd_jsd`, `gkd_forward_kl` (GKD's own loss: the student's samples, the exact
divergence from the teacher at every sampled position, `GKDTrainer`), `on_policy` (RLTrainer with `teacher=` and no
reward: the student's samples, each token's advantage the sampled reverse KL -(log π_student - log π_teacher)) and
`grpo` (RLTrainer on the 0/1 correctness reward). Each
student's greedy accuracy on held-out pairs is recorded every `eval_every` steps; each final model is scored by
greedy accuracy and pass@1. Writes results.json, results.md and results.png (accuracy over steps per method, the
teacher's as a line) under output_dir; every stage trains in its own folder, a stopped command continues where it
stopped, and finished stages are loaded, not trained again.
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
from paperloop.lm.distill import distill_loss, divergence_fn
from paperloop.models.lm import tiny_causal_lm

from ..rlvr.evaluate import evaluate as pass_at_k_and_greedy
from ..rlvr.task import correct, make_tokenizer, rl_prompts, sft_examples, split_problems
from ..stages import data_stage, output_folder, stage, stage_settings
from .evaluate import AccuracyCurve, seqkd_examples, write_results

PAPER = ('Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes" '
         '(GKD): on-policy distillation vs SFT, SeqKD and supervised KD at equal student steps, on two-digit addition')
METHODS = ("sft", "seqkd", "supervised_kd", "gkd_reverse_kl", "gkd_jsd", "gkd_forward_kl", "on_policy", "grpo")
SUPERVISED, ON_POLICY = ("sft", "seqkd", "supervised_kd"), ("on_policy", "grpo")
# GKD's own on-policy loss (λ = 1): the student's samples, the exact divergence from the teacher at every sampled
# position (`lm.distill`'s, as SFTTrainer distills): reverse KL, the generalized JSD at β = 0.5, forward KL
GKD = {"gkd_reverse_kl": dict(beta=1.0), "gkd_jsd": dict(beta=0.5), "gkd_forward_kl": dict(beta=0.0)}
LR_KEY = {**{m: "supervised_lr" for m in SUPERVISED}, **{m: "gkd_lr" for m in GKD}, **{m: "lr" for m in ON_POLICY}}
MAX_LENGTH = 16  # `99+99=` and `198` + EOS, with room to spare


@dataclass(frozen=True)
class Config(RLConfig):
    """RLConfig's keys configure every student method: `max_steps` steps each; a step trains on `batch_size` prompts
    x `num_generations` samples (on_policy, grpo, at `lr`) or on as many examples (sft, seqkd, supervised_kd, at
    `supervised_lr`)."""

    methods: Tuple[str, ...] = METHODS
    seeds: Tuple[int, ...] = (0,)  # each method once per seed, from the one student start
    held_out: int = 200  # pairs seen by no stage: every accuracy is measured on these
    data_seed: int = 0  # the split, and the teacher's and the student start's initial weights and data order
    teacher_hidden_size: int = 128
    teacher_num_layers: int = 4
    teacher_sft_steps: int = 800
    teacher_rl_steps: int = 200
    teacher_rl_batch_size: int = 16
    teacher_num_generations: int = 8
    teacher_rl_lr: float = 1e-4
    student_hidden_size: int = 64
    student_num_layers: int = 2
    student_sft_steps: int = 500  # the student start: SFT on ground truth to partial competence
    sft_batch_size: int = 64  # the teacher's and the student start's SFT
    sft_lr: float = 1e-3
    supervised_lr: float = 1e-3  # sft, seqkd, supervised_kd (on_policy and grpo train at `lr`)
    gkd_lr: float = 1e-4  # gkd_* (best of 3e-5, 1e-4, 3e-4, 1e-3 on seed 0: README)
    gkd_num_generations: int = 2  # gkd_*: samples per prompt (the paper's 1 is no group for RLTrainer), as many
    # completions a step as the others: batch_size x num_generations / gkd_num_generations prompts
    seqkd_temperature: float = 0.0  # the teacher's completions for SeqKD: 0 greedy, else sampled at it
    eval_every: int = 20  # student steps between points of the accuracy curve
    eval_samples: int = 16  # samples per held-out pair at eval_temperature for pass@1 (and pass@k up to it)
    num_threads: int = 1  # torch intra-op threads; 0: torch's default

    # Which runs to make and how they are scored may change between invocations, not how each trains.
    resume_may_change = RLConfig.resume_may_change + ("methods", "seeds", "eval_every", "eval_samples")

    def __post_init__(self):
        super().__post_init__()
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or len(set(self.methods)) < len(self.methods):
            raise ConfigError(f"methods: a non-empty list of distinct names from {list(METHODS)}, got "
                              f"{list(self.methods)}")
        if not self.seeds or len(set(self.seeds)) < len(self.seeds):
            raise ConfigError(f"seeds: a non-empty list of distinct seeds, got {list(self.seeds)}")
        if not 1 <= self.held_out < 8100:
            raise ConfigError(f"held_out: must be in [1, 8100), got {self.held_out}")
        if self.max_steps is None:
            raise ConfigError("max_steps: every student method trains this many steps; set it")
        for key in ("teacher_hidden_size", "teacher_num_layers", "teacher_sft_steps", "teacher_rl_steps",
                    "teacher_rl_batch_size", "student_hidden_size", "student_num_layers", "student_sft_steps",
                    "sft_batch_size", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.teacher_num_generations < 2:
            raise ConfigError(f"teacher_num_generations: must be >= 2 (GRPO's group baseline), got "
                              f"{self.teacher_num_generations}")
        if self.eval_samples < 1 or self.eval_samples & (self.eval_samples - 1):
            raise ConfigError(f"eval_samples: must be a power of 2, got {self.eval_samples}")
        if not 0 <= self.seqkd_temperature < float("inf"):
            raise ConfigError(f"seqkd_temperature: must be >= 0 (0: greedy), got {self.seqkd_temperature}")
        if self.seed != RLConfig.seed:
            raise ConfigError(f"seed: distill seeds its student methods with seeds=[...] (the teacher and the student "
                              f"start with data_seed); got seed={self.seed}")
        if self.gkd_num_generations < 2 or (self.batch_size * self.num_generations) % self.gkd_num_generations:
            raise ConfigError(f"gkd_num_generations: must be >= 2 and divide batch_size x num_generations = "
                              f"{self.batch_size * self.num_generations}, got {self.gkd_num_generations}")
        for key in ("sft_lr", "teacher_rl_lr", "supervised_lr", "gkd_lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}: must be > 0, got {getattr(self, key)}")


def run(cfg: Config) -> Path:
    if cfg.beta != RLConfig.beta or cfg.distill_coef != RLConfig.distill_coef:
        key = "beta" if cfg.beta != RLConfig.beta else "distill_coef"  # GKD's λ=1 pure on-policy, no KL to the start
        raise ConfigError(f"{key}: distill compares the methods as the paper defines them ({key}="
                          f"{getattr(RLConfig, key)}); it takes no other")
    if cfg.distill_discount != RLConfig.distill_discount and "grpo" in cfg.methods:  # found now, not after 4 stages
        raise ConfigError("distill_discount: only on_policy has a teacher's term to discount; run it with "
                          "methods=[on_policy] (grpo has no teacher)")
    out = output_folder(cfg.output_dir, cfg.num_threads)
    tokenizer = make_tokenizer()
    train, held_out = split_problems(cfg.held_out, cfg.data_seed)
    start = time.perf_counter()
    seconds: dict = {}
    stage(out / "teacher_sft", lambda f: teacher_sft_trainer(cfg, tokenizer, train, f), teacher_sft_settings(cfg))
    teacher, seconds["teacher"] = stage(out / "teacher", lambda f: teacher_rl_trainer(cfg, tokenizer, train, f),
                                        teacher_settings(cfg))
    seconds["teacher_sft"] = json.loads((out / "teacher_sft" / "stage.json").read_text())["seconds"]
    student, seconds["student_sft"] = stage(out / "student_sft", lambda f: student_sft_trainer(cfg, tokenizer, train, f),
                                            student_sft_settings(cfg))

    def score(model, seed):
        return pass_at_k_and_greedy(model, tokenizer, held_out, cfg.eval_samples, cfg.eval_temperature,
                                    cfg.max_new_tokens, seed)

    scored_teacher = {**score(teacher, cfg.data_seed), "train_seconds": round(seconds["teacher_sft"]
                                                                               + seconds["teacher"], 1)}
    scored_start = {**score(student, cfg.data_seed), "train_seconds": round(seconds["student_sft"], 1)}
    print(f"teacher {100 * scored_teacher['greedy_acc']:5.1f}% greedy, student start "
          f"{100 * scored_start['greedy_acc']:5.1f}%", flush=True)
    rows = []
    for seed in cfg.seeds:
        folder = out / f"seed{seed}"
        for method in cfg.methods:
            data = seqkd_stage(folder / "seqkd_data.json", cfg, teacher, tokenizer, train, seed) \
                if method == "seqkd" else None
            model, trained = stage(folder / method,
                                   lambda f: student_trainer(cfg, tokenizer, train, held_out, method, seed, f,
                                                             out / "student_sft" / "model", teacher, data),
                                   method_settings(cfg, method, seed))
            scores = score(model, seed)
            curve = json.loads((folder / method / "curve.json").read_text())
            rows.append({"method": method, "seed": seed, **scores, "curve": curve, "train_seconds": round(trained, 1)})
            print(f"seed {seed} {method:14s} greedy {100 * scores['greedy_acc']:5.1f}%  pass@1 "
                  f"{100 * scores['pass_at']['1']:5.1f}%", flush=True)
    seconds["total"] = round(time.perf_counter() - start, 1)
    write_results(out, PAPER, rows, scored_start, scored_teacher,
                  {"held_out": cfg.held_out, "eval_samples": cfg.eval_samples, "eval_temperature": cfg.eval_temperature,
                   "steps": cfg.max_steps,
                   "sequences_per_step": cfg.batch_size * cfg.num_generations, "seconds": seconds,
                   "teacher_size": f"width {cfg.teacher_hidden_size}, {cfg.teacher_num_layers} layers",
                   "student_size": f"width {cfg.student_hidden_size}, {cfg.student_num_layers} layers",
                   "settings": settings(cfg)})
    return out


# ---- settings: what a finished stage was trained with -------------------------------------------------------------

TEACHER_SFT_KEYS = ("held_out", "data_seed", "teacher_hidden_size", "teacher_num_layers", "teacher_sft_steps",
                    "sft_batch_size", "sft_lr", "num_threads")
TEACHER_RL_KEYS = ("teacher_rl_steps", "teacher_rl_batch_size", "teacher_num_generations", "teacher_rl_lr",
                   "max_new_tokens")
STUDENT_SFT_KEYS = ("held_out", "data_seed", "student_hidden_size", "student_num_layers", "student_sft_steps",
                    "sft_batch_size", "sft_lr", "num_threads")
# Keys that change nothing a finished stage holds (which runs are made, how they are scored, logged or saved).
NOT_SETTINGS = ("output_dir", "log_every_steps", "checkpoint_every_steps", "time_limit_s", "val_every",
                "val_every_steps", "log_completions", "micro_batch_size", "methods", "seeds", "eval_every",
                "eval_samples", "eval_temperature", "eval_num_generations", "eval_pass_threshold", "seed")


def settings(cfg: Config) -> dict:
    return stage_settings(cfg, NOT_SETTINGS)


def teacher_sft_settings(cfg: Config) -> dict:
    return {k: v for k, v in settings(cfg).items() if k in TEACHER_SFT_KEYS}


def teacher_settings(cfg: Config) -> dict:
    return {**teacher_sft_settings(cfg), **{k: v for k, v in settings(cfg).items() if k in TEACHER_RL_KEYS}}


def student_sft_settings(cfg: Config) -> dict:
    return {k: v for k, v in settings(cfg).items() if k in STUDENT_SFT_KEYS}


def method_settings(cfg: Config, method: str, seed: int) -> dict:
    """Everything a student method's stage depends on: the teacher's and the start's settings, the student keys (the
    learning rate of its family, SeqKD's temperature for seqkd only), the method and the seed."""
    other = {key for key in LR_KEY.values() if key != LR_KEY[method]}  # the other families' learning rates
    if method not in GKD:
        other.add("gkd_num_generations")
    if method != "seqkd":
        other.add("seqkd_temperature")
    own = {k: v for k, v in settings(cfg).items() if k not in other}
    return {**own, "method": method, "seed": seed}


# ---- the stages ---------------------------------------------------------------------------------------------------

def sft_config(folder: Path, cfg: Config, batch_size: int, lr: float, steps: int, seed: int, **distill) -> SFTConfig:
    return SFTConfig(max_length=MAX_LENGTH, batch_size=batch_size, lr=lr, max_steps=steps, seed=seed,
                     output_dir=str(folder), log_every_steps=cfg.log_every_steps,
                     checkpoint_every_steps=cfg.checkpoint_every_steps, **distill)


def teacher_sft_trainer(cfg: Config, tokenizer, pairs, folder: Path) -> SFTTrainer:
    """rlvr's first stage for the teacher: completion-only cross-entropy on `a+b=` -> the sum + EOS."""
    model = tiny_causal_lm(len(tokenizer), cfg.teacher_hidden_size, cfg.teacher_num_layers, seed=cfg.data_seed)
    config = sft_config(folder, cfg, cfg.sft_batch_size, cfg.sft_lr, cfg.teacher_sft_steps, cfg.data_seed)
    return SFTTrainer(model, config, tokenizer=tokenizer, train_data=sft_examples(pairs),
                      callbacks=[TensorBoardLogger(), ProgressBar()])


def teacher_rl_trainer(cfg: Config, tokenizer, pairs, folder: Path) -> RLTrainer:
    """rlvr's second stage for the teacher: GRPO (group-std advantages, sequence mean) on the 0/1 reward."""
    from transformers import AutoModelForCausalLM

    config = RLConfig(batch_size=cfg.teacher_rl_batch_size, num_generations=cfg.teacher_num_generations,
                      max_new_tokens=cfg.max_new_tokens, lr=cfg.teacher_rl_lr, max_steps=cfg.teacher_rl_steps,
                      seed=cfg.data_seed, output_dir=str(folder), log_every_steps=cfg.log_every_steps,
                      checkpoint_every_steps=cfg.checkpoint_every_steps)
    return RLTrainer(AutoModelForCausalLM.from_pretrained(folder.parent / "teacher_sft" / "model"), config,
                     tokenizer=tokenizer, train_data=rl_prompts(pairs), reward_fns=[correct],
                     callbacks=[TensorBoardLogger(), ProgressBar()])


def student_sft_trainer(cfg: Config, tokenizer, pairs, folder: Path) -> SFTTrainer:
    """The student start, shared by every method and seed: SFT on ground truth for a few steps."""
    model = tiny_causal_lm(len(tokenizer), cfg.student_hidden_size, cfg.student_num_layers, seed=cfg.data_seed)
    config = sft_config(folder, cfg, cfg.sft_batch_size, cfg.sft_lr, cfg.student_sft_steps, cfg.data_seed)
    return SFTTrainer(model, config, tokenizer=tokenizer, train_data=sft_examples(pairs),
                      callbacks=[TensorBoardLogger(), ProgressBar()])


def seqkd_stage(path: Path, cfg: Config, teacher, tokenizer, pairs, seed: int) -> list[dict]:
    """The seed's SeqKD data: the teacher's completion of every training prompt, drawn once and kept in `path` (a
    file written with other settings is refused, naming the key)."""
    wanted = {**teacher_settings(cfg), "seqkd_temperature": cfg.seqkd_temperature, "seed": seed}
    return data_stage(path, wanted, lambda: seqkd_examples(teacher, tokenizer, pairs, cfg.max_new_tokens,
                                                           cfg.seqkd_temperature, seed), "SeqKD data", "examples")


def student_trainer(cfg: Config, tokenizer, pairs, held_out, method: str, seed: int, folder: Path, start: Path,
                    teacher, seqkd_data=None):
    """One student method from the student start, seeded by `seed` (data order and sampling), `max_steps` steps of
    `batch_size x num_generations` completions (at `supervised_lr` or `lr`), its held-out accuracy recorded every
    `eval_every` steps."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(start)
    callbacks = [TensorBoardLogger(), ProgressBar(),
                 AccuracyCurve(tokenizer, held_out, cfg.max_new_tokens, cfg.eval_every, folder / "curve.json")]
    if method in SUPERVISED:
        examples = {"sft": sft_examples(pairs), "supervised_kd": sft_examples(pairs), "seqkd": seqkd_data}[method]
        # Pure distillation (weight 1, GKD's supervised KD): the ground-truth tokens only choose where to match
        distill = dict(distill="forward_kl", distill_weight=1.0) if method == "supervised_kd" else {}
        config = sft_config(folder, cfg, cfg.batch_size * cfg.num_generations, cfg.supervised_lr, cfg.max_steps, seed,
                            **distill)
        return SFTTrainer(student, config, tokenizer=tokenizer, train_data=examples, callbacks=callbacks,
                          **({"teacher": teacher} if method == "supervised_kd" else {}))
    keys = {f.name for f in dataclasses.fields(RLConfig)}
    config = RLConfig(**{**{k: v for k, v in dataclasses.asdict(cfg).items() if k in keys}, "seed": seed,
                         "output_dir": str(folder)})
    if method in GKD:  # as many completions a step, over more prompts
        G = cfg.gkd_num_generations
        config = dataclasses.replace(config, lr=cfg.gkd_lr, num_generations=G,
                                     batch_size=cfg.batch_size * cfg.num_generations // G)
        return GKDTrainer(student, config, tokenizer=tokenizer, train_data=rl_prompts(pairs), teacher=teacher,
                          callbacks=callbacks, divergence=divergence_fn("jsd", **GKD[method]))
    if method == "on_policy":  # no reward: each sampled token's advantage is the teacher's term alone
        return RLTrainer(student, config, tokenizer=tokenizer, train_data=rl_prompts(pairs), teacher=teacher,
                         callbacks=callbacks)
    return RLTrainer(student, config, tokenizer=tokenizer, train_data=rl_prompts(pairs), reward_fns=[correct],
                     callbacks=callbacks)


class GKDTrainer(RLTrainer):
    """GKD's on-policy distillation as the paper trains it (λ = 1): RLTrainer's rollouts (the student samples; the
    sampler, the data order and a resume are RLTrainer's), and instead of a policy gradient the loss is the exact
    divergence from the teacher over the vocabulary at every sampled position, differentiated through the student's
    distribution (`lm.distill.distill_loss`, what `SFTTrainer(teacher=...)` trains on fixed data), the mean over a
    micro-batch's sampled tokens (the update's, with the one micro-batch an update this paper runs). No reward and no
    advantage: the teacher's sampled term RLTrainer computes is only logged."""

    def __init__(self, *args, divergence, **kwargs):
        super().__init__(*args, **kwargs)
        self.divergence = divergence

    def training_step(self, batch: dict):
        parts = distill_loss(self.model, self.teacher, batch, self.divergence, 1.0)
        return parts["loss"], {"policy/divergence": parts["distill/kl"].detach()}
