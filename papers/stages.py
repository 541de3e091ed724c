"""What the papers that train in stages share (rlvr, retool: SFT, then RL from the SFT model): a stage trained in its
own folder, or loaded when it was finished with the same settings, and the settings that identify it.

    out = output_folder(cfg.output_dir, cfg.num_threads)
    model, seconds = stage(out / "sft", lambda folder: make_sft_trainer(folder), stage_settings(cfg, NOT_SETTINGS))

A stage interrupted by a signal or a time limit checkpoints and the command stops; the same command again
continues it (`fit(resume="auto")`), and loads the stages already done instead of training them again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from paperloop import ConfigError, RLTrainer
from paperloop.lm.weights import no_shard_progress_bar


def output_folder(output_dir: str, num_threads: int) -> Path:
    """The run's output folder, made; torch's intra-op threads set to `num_threads` (0: torch's default)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if num_threads:
        torch.set_num_threads(num_threads)
    return out


def stage_settings(cfg, not_settings) -> dict:
    """`cfg`'s keys but `not_settings` (those that change nothing a finished stage holds), as JSON values: what a
    finished stage records and is compared by."""
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k not in not_settings}))


def stage(folder: Path, build, settings: dict, model_class=None) -> tuple[object, float]:
    """Train one stage in `folder` (continuing its checkpoints if a signal or a time limit stopped it), save its
    final model to `folder/model` and its settings beside it; a stage finished with these same settings is loaded
    instead (with `model_class.from_pretrained`, default `AutoModelForCausalLM`; a reward model's stage passes
    `AutoModelForSequenceClassification`), one finished with others is refused (naming the key). `build(folder)`
    makes its trainer. Returns (model, training seconds)."""
    if (folder / "model" / "config.json").exists():
        return finished_stage(folder, settings, model_class)
    trainer = build(folder)
    start = time.perf_counter()
    state = trainer.fit(resume="auto")  # continues a stage a signal or a time limit stopped
    if state.interrupted:
        raise KeyboardInterrupt(f"{folder.name} was interrupted at step {state.global_step} and checkpointed; run the "
                                "same command again to continue")
    seconds = time.perf_counter() - start
    with no_shard_progress_bar():  # a stage's end is no step to wait on: no "Writing model shards" bar
        trainer.unwrapped_model.save_pretrained(folder / "model")
    facts = {"settings": settings, "seconds": seconds}
    if isinstance(trainer, RLTrainer):  # every prompt the plan handed out (with dynamic sampling, more than steps x B)
        plan = trainer.plan
        facts["prompts_sampled"] = (plan.epoch * plan.steps_per_epoch() + plan.offset) * plan.samples_per_step
    (folder / "stage.json").write_text(json.dumps(facts, indent=1) + "\n")
    return trainer.unwrapped_model.eval(), seconds


def finished_stage(folder: Path, settings: dict, model_class=None) -> tuple[object, float]:
    """The model of the stage finished in `folder` and its training seconds, or a ConfigError naming the first key
    whose recorded value is not the one in `settings`."""
    from transformers import AutoModelForCausalLM

    record = folder / "stage.json"
    recorded = json.loads(record.read_text())["settings"] if record.exists() else None
    if recorded != settings:
        key = next((k for k in settings if recorded is not None and recorded.get(k) != settings[k]), None)
        if key is None:
            why = "records no settings it was trained with"
        elif key not in recorded:  # written before the key was recorded
            why = f"records no {key} (this command asks for {settings[key]!r})"
        else:
            why = f"was trained with {key}={recorded[key]!r}, this command asks for {settings[key]!r}"
        raise ConfigError(f"{key or 'output_dir'}: the finished {folder.name} stage in {folder} {why}; use "
                          f"another output_dir, or remove {folder} to train it again")
    model = (model_class or AutoModelForCausalLM).from_pretrained(folder / "model").eval()
    return model, json.loads(record.read_text())["seconds"]


def data_stage(path: Path, settings: dict, make, what: str, field: str) -> list:
    """Data a paper draws once (SeqKD's teacher samples, DPO's labelled pairs): `make()` writes them to `path` (JSON,
    under `field`, beside the `settings` they were made with; atomically), and a later run reads them back. A file
    made with other settings is refused, naming the first key that differs (`what` names the data in the error)."""
    if path.exists():
        record = json.loads(path.read_text())
        if record["settings"] != settings:
            key = next(k for k in settings if record["settings"].get(k) != settings[k])
            raise ConfigError(f"{key}: {path} holds {what} made with {key}={record['settings'].get(key)!r}, this "
                              f"command asks for {settings[key]!r}; use another output_dir, or remove {path.parent}")
        return record[field]
    data = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, field: data}) + "\n")
    os.replace(tmp, path)
    return data
