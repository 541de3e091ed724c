"""Behaviours a mutation pass broke without a test failing (issue 26): validation episodes independent of the training
step, boundaries (a transcript that exactly fits, a result of exactly max_chars, dynamic sampling stopping as soon as
it can), a soft-capped model's temperature, a stop token drawn at a turn's last step, CISPO's detached weight."""

import math

import pytest
import torch

from paperloop.callbacks import LambdaCallback
from paperloop.envs import Env, StepResult
from paperloop.rl import policy_loss
from paperloop.rl.tools import run_tool

from tests.support.rl import Retry, first_digit_reward, make_prompts, make_rl_trainer, make_tokenizer


def test_cispo_weight_is_detached_below_the_cap_too():
    """ρ = 1.1 < 1 + clip_high: the gradient is -sg(ρ)·A·∇logπ = -1.1; a weight left in the graph gives
    -(ρ + ρ log ρ) = -1.205 (at a capped token the two agree, so only a token below the cap tells them apart)."""
    logp = torch.tensor([[math.log(1.1)]], dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([1.0]), torch.ones(1, 1),
                          loss="cispo")
    assert torch.autograd.grad(loss, logp)[0].item() == pytest.approx(-1.1)


def test_a_soft_capped_model_is_scored_at_the_temperature_it_was_sampled_at(tmp_path):
    """Gemma 2 caps its logits, then sampling and training both divide them by the temperature: the sampler's
    log-probs are the training forward's (policy/sampler_logprob_gap at float32 noise), at temperature 0.7."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                           head_dim=16, final_logit_softcapping=2.0, pad_token_id=0,
                                           initializer_range=0.5, max_position_embeddings=64))
    outputs = []
    trainer = make_rl_trainer(tmp_path, model=gemma, temperature=0.7, max_steps=2,
                              callbacks=[LambdaCallback(on_batch_end=lambda t, o: outputs.append(o))])
    trainer.fit()
    assert all(float(o["policy/sampler_logprob_gap"]) < 1e-5 for o in outputs)


class FixedPrompt(Env):
    """Two turns; every action's last sampled token may be a stop token at max_new_tokens exactly."""

    def __init__(self, example):
        self.example = example

    def reset(self, seed):
        return self.example["prompt"]

    def step(self, action):
        return StepResult(reward=float(len(action)), observation="1=")


def test_a_stop_token_drawn_at_a_turns_last_step_reaches_the_cache(tmp_path):
    """With actions of 2 tokens, many stop exactly at their last step: the token must still be fed before the
    observation, or the next turn's log-probs are off (a gap far above float32 noise)."""
    outputs = []
    trainer = make_rl_trainer(tmp_path, env=FixedPrompt, max_turns=3, max_new_tokens=2, max_steps=3,
                              callbacks=[LambdaCallback(on_batch_end=lambda t, o: outputs.append(o))])
    stopped_at_last = []
    play = trainer.play

    def spying(*args, **kwargs):
        episodes = play(*args, **kwargs)
        stop = set(trainer.stop_token_ids)
        for tokens, policy in zip(episodes.transcripts(), episodes.policy_N_T.tolist()):
            runs = [i for i in range(1, len(tokens)) if policy[i] and not policy[i - 1]]  # each action's start
            stopped_at_last.extend(tokens[i + 1] in stop for i in runs if i + 1 < len(tokens) and policy[i + 1])
        return episodes

    trainer.play = spying
    trainer.fit()
    assert any(stopped_at_last)  # the case happens
    assert all(float(o["policy/sampler_logprob_gap"]) < 1e-5 for o in outputs)


def test_validation_episodes_do_not_depend_on_the_training_step_and_sampled_ones_do(tmp_path):
    """Greedy validation episodes are reset with seeds from (run seed, the example's content): the same at every
    step. The sampled ones come from a stream seeded by (run seed, step, process): the same when validating twice at
    one step, other draws at another step, even with the weights unchanged (lr 0)."""
    seeds, sampled = {}, {}
    trainer = make_rl_trainer(tmp_path, env=Retry, max_turns=2, lr=0.0, max_steps=2, val_every_steps=1,
                              val_data=make_prompts(4, seed=3), eval_num_generations=4)
    episodes = trainer.validation_episodes

    def spying(batch, n, temperature, generator):
        start = len(Retry.log)
        played = episodes(batch, n, temperature, generator)
        key = (trainer.state.global_step, n)
        seeds.setdefault(key, []).append([record["seed"] for record in Retry.log[start:]])
        if n > 1:
            sampled.setdefault(trainer.state.global_step, []).append(played.transcripts())
        return played

    trainer.validation_episodes = spying
    Retry.log = []
    try:
        trainer.fit()
        again = trainer.validate()  # at step 2 again
    finally:
        Retry.log = None
    assert seeds[(1, 1)] == seeds[(2, 1)][:1] and len(seeds[(1, 1)][0]) == 4  # greedy: the same seeds at every step
    assert seeds[(1, 4)] == seeds[(2, 4)][:1]  # sampled episodes' resets too: by the example's content
    assert sampled[2][0] == sampled[2][1]  # sampled: the same draws twice at one step
    assert sampled[1][0] != sampled[2][0]  # and other draws at another step, the weights unchanged
    assert "val/pass@4" in again


def test_a_transcript_that_exactly_fits_the_context_is_played(tmp_path):
    """max_position_embeddings = the first observation + max_new_tokens exactly: accepted, not refused."""
    tok = make_tokenizer()
    prompt_len = len(tok(make_prompts(1)[0]["prompt"])["input_ids"])
    from paperloop.models.lm import tiny_causal_lm

    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=prompt_len + 5)
    trainer = make_rl_trainer(tmp_path, model=model, max_new_tokens=5, max_steps=1, prompts=4, batch_size=4)
    trainer.fit()
    assert trainer.state.global_step == 1


def test_a_tool_result_of_exactly_max_chars_is_not_cut():
    assert run_tool(lambda: "x" * 10, (), {}, 1.0, 10) == ("x" * 10, False)
    assert run_tool(lambda: "x" * 11, (), {}, 1.0, 10)[0].startswith("x" * 10 + "... [1 more")


def test_dynamic_sampling_stops_drawing_as_soon_as_it_has_enough_groups_with_a_spread(tmp_path):
    """A round is drawn only while the groups with a spread are fewer than batch_size: after the round that
    reaches it, no further one (a mutant drawing one round more trained the same groups, so nothing else told)."""
    outputs, drawn = [], []
    trainer = make_rl_trainer(tmp_path, prompts=24, dynamic_sampling=True, max_sample_rounds=6, max_steps=4,
                              max_epochs=None, reward_fns=(first_digit_reward,),
                              callbacks=[LambdaCallback(on_batch_end=lambda t, o: outputs.append(o))])
    spreads = []
    rollout = trainer.rollout

    def spying(indices):
        rollouts = rollout(indices)
        drawn.append(trainer.state.global_step)
        rewards_P_G = rollouts.rewards_N.reshape(-1, 4)
        spreads.append((trainer.state.global_step, int((rewards_P_G.amax(1) != rewards_P_G.amin(1)).sum())))
        return rollouts

    trainer.rollout = spying
    trainer.fit()
    for step in range(4):
        per_round = [n for s, n in spreads if s == step]
        before_last = sum(per_round[:-1])
        assert before_last < 4  # every round but the last was needed
        assert sum(per_round) >= 4 or len(per_round) == 6
