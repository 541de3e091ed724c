"""The Metrics page's table (docs/metrics.md) is the one list of metric keys: every key the trainers write (to `on_batch_end`, the
epoch's logs and TensorBoard) is in it, and every key in it is written by some run here; rates are spelled
`perf/<what>_per_s`, durations `time/<what>_s`."""

import re
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.support.engine import make_resume_trainer
from paperloop.callbacks import LambdaCallback, TensorBoardLogger
from tests.support.rl import make_lm, make_prompts, make_rl_trainer, make_tokenizer
from tests.support.lm import sorting_examples
from tests.support.preference import make_dpo, make_pairs, make_rm

METRICS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
ONLY_WITH = {"time/compile_s"}  # written with compile=True only: the compile test checks it


def documented() -> set[str]:
    keys = set()
    for row in re.findall(r"^\| (`[^|]*`) \|", METRICS_PAGE.read_text(), flags=re.M):
        keys.update(re.findall(r"`([^`]+)`", row))
    return keys


def written(trainer) -> set[str]:
    """The keys `trainer.fit()` writes: step outputs, epoch logs and TensorBoard tags (scalars and text)."""
    keys = set()
    trainer.callbacks += [TensorBoardLogger(every_n_steps=1),
                          LambdaCallback(on_batch_end=lambda t, o: keys.update(o),
                                         on_epoch_end=lambda t, logs: keys.update(logs))]
    trainer.fit()
    keys.update(trainer.validate())
    events = EventAccumulator(str(Path(trainer.config.output_dir) / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    keys.update(tags["scalars"])
    keys.update(tag.removesuffix("/text_summary") for tag in tags["tensors"])
    return keys - {"loss", "epoch", "config"}  # this process's micro-batch loss; the epoch number; the config text


def test_every_metric_written_is_documented_once_and_every_documented_one_is_written(tmp_path):
    base = {k for k in written(make_resume_trainer(tmp_path / "base", max_epochs=1)) if not k.startswith("val/")}
    sft = written(_sft(tmp_path / "sft")) | written(_sft(tmp_path / "kd", teacher=True))
    rl = written(_rl(tmp_path / "rl")) | written(_rl_env(tmp_path / "rl_env")) | written(
        make_rl_trainer(tmp_path / "distill_async", max_steps=2, teacher=make_lm(make_tokenizer(), seed=5),
                        val_data=make_prompts(4, seed=3), async_generation=True, max_lag=1))
    preference = written(make_dpo(tmp_path / "dpo", max_steps=2, val_data=make_pairs(4, seed=1))) | written(
        make_rm(tmp_path / "rm", max_steps=2, val_data=make_pairs(4, seed=1)))
    keys = {re.sub(r"pass@\d+", "pass@<k>", k.replace("digit_reward", "<function>"))
            for k in base | sft | rl | preference}
    # an environment's steps' own metrics; its return is the one reward, named "env" like a reward function
    keys = {"env/<key>" if k.startswith("env/") else k.replace("reward/env", "reward/<function>") for k in keys}
    table = documented()
    assert keys - table == set(), "written but not in the Metrics page's table"
    assert table - keys - ONLY_WITH == set(), "in the Metrics page's table but written by no trainer"
    for key in table:
        assert not re.search(r"_per_sec|/s$|_sec$|_seconds$", key), key  # one spelling per kind
        if key.startswith("perf/"):
            assert key.endswith("_per_s"), key
        if key.startswith("time/"):
            assert key.endswith("_s"), key


def _sft(out, teacher: bool = False):
    """SFT with an eval_fn; with `teacher`, off-policy distillation (its `distill/` keys)."""
    from paperloop import SFTConfig, SFTTrainer
    from tests.support.lm import model, tokenizer

    config = SFTConfig(max_length=24, batch_size=8, max_epochs=1, output_dir=str(out), eval_max_new_tokens=4)
    return SFTTrainer(model(), config, tokenizer=tokenizer(), train_data=sorting_examples(16),
                      val_data=sorting_examples(4, seed=1), eval_fn=lambda example, text: 0.0,
                      teacher=model(seed=3) if teacher else None)


def _rl_env(out):
    """A multi-turn environment: its turns, its share of the transcript, its steps' own metrics."""
    from tests.support.rl import Retry
    trainer = make_rl_trainer(out, max_steps=2, env=Retry, max_turns=2)
    trainer.val_data = make_prompts(4, seed=3)
    return trainer


def _rl(out):
    """Every RL option that adds a metric: the KL, delta, the entropy mask, DAPO's shaping, sampled validation."""
    trainer = make_rl_trainer(out, max_steps=2, beta=0.1, delta=2.0, top_entropy_quantile=0.5, overlong_buffer=2,
                              dynamic_sampling=True, eval_num_generations=2)
    trainer.val_data = make_prompts(4, seed=3)
    return trainer
