"""paperloop.preference: preference optimization of language models (the DPO family) and reward models.

    from paperloop.preference import DPOTrainer, DPOConfig                 # also `from paperloop`
    from paperloop.preference import preference_loss, register_preference_loss

- `losses.py`: the preference losses (`sigmoid` = DPO/cDPO, `robust`, `hinge`, `ipo`, `simpo`, `sft`), registered
  pure functions of per-pair summed log-probs, and `preference_loss`, which combines them by weight
- `data.py`: prompt / chosen / rejected pairs as tokens (SFT's masks), and their batch (both sides, one forward)
- `dpo.py`: `DPOTrainer` and `DPOConfig`
- `reward.py`: `RewardTrainer` and `RewardConfig` (a Bradley-Terry reward model), and `RewardModelScorer`, a trained
  one as RLTrainer's reward function (one forward per rollout batch)

This room stands on the language-model layer (`paperloop.lm`) and the engine; it imports nothing from `paperloop.rl`.
"""

from .data import Pair, pair_batch, tokenize_pairs
from .dpo import DPOConfig, DPOTrainer
from .losses import (PREFERENCE_LOSSES, PairLogps, PreferenceOptions, preference_loss, register_preference_loss)
from .reward import RewardConfig, RewardModelScorer, RewardTrainer, bradley_terry_loss

__all__ = ["DPOConfig", "DPOTrainer", "Pair", "pair_batch", "tokenize_pairs", "PREFERENCE_LOSSES", "PairLogps",
           "PreferenceOptions", "preference_loss", "register_preference_loss", "RewardConfig", "RewardTrainer",
           "RewardModelScorer", "bradley_terry_loss"]
