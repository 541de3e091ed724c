"""A policy loss owns its settings: a setting the chosen loss does not read is refused, naming the setting and the
loss, instead of being accepted and ignored; a registered loss declares what it reads."""

import numpy as np
import pytest
import torch

from paperloop import RLConfig
from paperloop.callbacks import JSONLLogger
from paperloop.config import ConfigError
from paperloop.rl import POLICY_LOSSES, loss_traits, register_policy_loss

from tests.support.rl import make_rl_trainer


@pytest.mark.parametrize("settings, key", [
    (dict(policy_loss="cispo", delta=2.0), "delta"), (dict(policy_loss="sapo", delta=2.0), "delta"),
    (dict(policy_loss="gspo", delta=2.0, clip_low=3e-4, clip_high=4e-4), "delta"),
    (dict(policy_loss="ppo_clip", sapo_tau_pos=2.0), "sapo_tau_pos"), (dict(policy_loss="sapo", clip_low=0.1), "clip_low"),
    (dict(policy_loss="sapo", clip_high=0.28), "clip_high"), (dict(policy_loss="cispo", clip_low=0.1), "clip_low"),
    (dict(policy_loss="gspo", sapo_tau_neg=2.0), "sapo_tau_neg"),
])
def test_a_setting_the_chosen_loss_does_not_read_is_refused_naming_both(settings, key):
    with pytest.raises(ConfigError, match=rf"^{key}: policy_loss='{settings['policy_loss']}' does not read it"):
        RLConfig(batch_size=4, **settings)


@pytest.mark.parametrize("settings", [
    dict(policy_loss="ppo_clip", clip_low=0.1, clip_high=0.28, delta=2.0), dict(policy_loss="cispo", clip_high=4.0),
    dict(policy_loss="sapo", sapo_tau_pos=2.0, sapo_tau_neg=3.0), dict(policy_loss="gspo", clip_low=3e-4, clip_high=4e-4),
])
def test_the_settings_a_loss_reads_are_taken(settings):
    config = RLConfig(batch_size=4, **settings)
    assert {k: config.loss_settings[k] for k in settings if k != "policy_loss"} == \
        {k: v for k, v in settings.items() if k != "policy_loss"}


def test_a_registered_loss_declares_what_it_reads_and_one_loss_per_sequence():
    assert loss_traits("ppo_clip").reads == ("clip_low", "clip_high", "delta")
    assert loss_traits("gspo").one_per_sequence and not loss_traits("cispo").one_per_sequence
    with pytest.raises(ValueError, match="reads \\['tau'\\], which are not LossOptions fields"):
        register_policy_loss("test_unknown_setting", reads=("tau",))
    assert "test_unknown_setting" not in POLICY_LOSSES

    @register_policy_loss("test_sequence_loss", reads=("clip_high",), one_per_sequence=True)
    def _sequence(log_ratio_B_T, advantages_B_1, weights_B_T, options):
        return -log_ratio_B_T.sum(1, keepdim=True).expand_as(log_ratio_B_T) * advantages_B_1, {}
    try:
        RLConfig(batch_size=4, policy_loss="test_sequence_loss", clip_high=0.3)
        with pytest.raises(ConfigError, match="^clip_low: policy_loss='test_sequence_loss' does not read it"):
            RLConfig(batch_size=4, policy_loss="test_sequence_loss", clip_low=0.3)
        with pytest.raises(ConfigError, match="^top_entropy_quantile: test_sequence_loss gives every token"):
            RLConfig(batch_size=4, policy_loss="test_sequence_loss", top_entropy_quantile=0.2)
    finally:
        del POLICY_LOSSES["test_sequence_loss"]


def test_chat_prompts_holding_numpy_values_are_logged_not_a_crash_at_the_first_log(tmp_path):
    prompts = [{"messages": [{"role": "user", "content": f"{a}+{b}=", "id": np.int64(k)}], "answer": str(a + b)}
               for k, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 1)] * 2)]
    trainer = make_rl_trainer(tmp_path, max_steps=1, callbacks=[JSONLLogger()])
    trainer.train_data = prompts
    trainer.fit()
    records = (tmp_path / "rollouts.jsonl").read_text().splitlines()
    assert len(records) == 2 and all('"id": ' in record for record in records)  # log_completions=2, ids as numbers


@pytest.mark.parametrize("value, count", [(True, 4), (False, 0), (7, 7), (0, 0)])
def test_log_completions_takes_a_count_or_trls_flag(value, count):
    """TRL's `log_completions=True` means "log some": here the default count; False logs none."""
    config = RLConfig(batch_size=4, log_completions=value)
    assert config.log_completions == count and type(config.log_completions) is int


@pytest.mark.parametrize("value, message", [("yes", "must be an integer or true or false"), (-1, "must be >= 0")])
def test_log_completions_refuses_what_is_neither(value, message):
    with pytest.raises(ConfigError, match=f"^log_completions: {message}"):
        RLConfig(batch_size=4, log_completions=value)
