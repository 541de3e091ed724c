"""RLTrainer: its updates against a naive GRPO loop written from the papers' formulas (one unpadded forward per
completion, plain SGD), the batch it builds, the reference model, reward-function errors, zero-std groups, its
metrics, and exact resume after SIGKILL (between rollout batches, during generation, between updates)."""

import copy
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from paperloop import CheckpointError, RLConfig, RLTrainer
from paperloop.callbacks import LambdaCallback
from paperloop.config import ConfigError
from paperloop.plans import epoch_permutation
from paperloop.rl import Episodes, rollout_batch, split_rows
from paperloop.rl.trainer import disable_dropout
from paperloop.models.lm import tiny_causal_lm, word_level_tokenizer
from paperloop.lm.data import prompt_ids
from paperloop.lm.sampling import sample
from tests.support.callbacks import StopAt
from tests.support.engine import assert_bitwise_equal, straight_and_resumed, weights
from tests.support.workers import run_worker
from paperloop.checkpoint import committed

from tests.support.rl import (DDP_DAPO, DDP_ENV, DDP_RUN, DIGITS, RESUME_RUNS, LayoutFreeEpisodes, digit_reward,
                              first_digit_reward, make_lm, make_prompts, make_rl_trainer, make_tokenizer)

WORKER = Path(__file__).with_name("resume_worker.py")  # the RL fixture, killed mid-run
DDP_WORKER = Path(__file__).with_name("ddp_worker.py")

# ---- the update against a naive loop ----------------------------------------------------------------------


def naive_advantages(rewards, G, normalize):
    out, batch_std = [], statistics.stdev(rewards)
    for g in range(0, len(rewards), G):
        group = rewards[g:g + G]
        mean = sum(group) / G
        if max(group) == min(group):
            out += [0.0] * G
            continue
        scale = {"group_std": statistics.stdev(group) + 1e-4, "batch_std": batch_std + 1e-4, "none": 1.0}[normalize]
        out += [(r - mean) / scale for r in group]
    return out


def row_logprobs(model, prompt, completion, temperature, with_entropy=False):
    """log softmax(logits / T) of each completion token, from one unpadded forward of prompt + completion (and
    each position's entropy of softmax(logits / T))."""
    logits = model(torch.tensor([prompt + completion]), use_cache=False).logits[0, len(prompt) - 1:-1] / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, torch.tensor(completion)[:, None])[:, 0]
    return (chosen, -(logprobs.exp() * logprobs).sum(dim=1)) if with_entropy else chosen


def naive_token_loss(cfg: RLConfig, logp, old, a):
    """The per-token loss of cfg.policy_loss by its paper's formula, for one completion."""
    ratio = torch.exp(logp - old)
    if cfg.policy_loss == "gspo":  # Zheng et al. 2025: one ratio per sequence, the geometric mean of the tokens'
        s = torch.exp((logp - old).mean())
        return (-torch.minimum(s * a, s.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * a)).expand(len(logp))
    if cfg.policy_loss == "cispo":  # MiniMax-M1: a capped, detached weight times the REINFORCE term
        return -ratio.clamp(max=1 + cfg.clip_high).detach() * a * logp
    if cfg.policy_loss == "sapo":  # Gao et al. 2025: a sigmoid gate, its temperature by the advantage's sign
        tau = cfg.sapo_tau_pos if a > 0 else cfg.sapo_tau_neg
        return -(4 / tau) * torch.sigmoid(tau * (ratio - 1)) * a
    unclipped = ratio if cfg.delta is None else ratio.clamp(max=cfg.delta)  # INTELLECT-2's two-sided clip
    return -torch.minimum(unclipped * a, ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * a)


def naive_grpo(cfg: RLConfig, sampler_state: torch.Tensor, steps: int, reward=digit_reward):
    """GRPO and its variants by the formulas, one completion at a time, in float64: per token the policy loss
    (masked to the top-entropy tokens) + β·k3, ρ against the log-probs before the step's first update, aggregated
    per minibatch as the papers write it, minus the entropy bonus; DAPO's dynamic sampling, overlong shaping and
    truncation mask as its paper describes them."""
    tok, data = make_tokenizer(), make_prompts()
    policy, reference = make_lm(tok).double(), make_lm(tok).double()
    optimizer = torch.optim.SGD(policy.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(0)
    generator.set_state(sampler_state)
    stop = [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")]
    order = epoch_permutation(len(data), cfg.seed, 0)
    B, G, T, L = cfg.batch_size, cfg.num_generations, cfg.temperature, cfg.max_new_tokens
    position = 0  # in steps of B prompts
    for s in range(steps):
        groups, rounds = [], 0  # (prompt ids, example, completions, rewards as the reward function gave them)
        while True:
            examples = [data[i] for i in order[position * B:(position + 1) * B].tolist()]
            position, rounds = position + 1, rounds + 1
            prompts = [tok(e["prompt"])["input_ids"] for e in examples]
            completions = sample(policy, prompts, G, L, generator=generator, temperature=T, top_p=cfg.top_p,
                                 eos_token_id=stop, pad_token_id=0).completions()
            for p, (prompt, example) in enumerate(zip(prompts, examples)):
                group = completions[p * G:(p + 1) * G]
                groups.append((prompt, group, [reward(None, tok.decode(c, skip_special_tokens=True), example)
                                               for c in group]))
            with_spread = sum(max(g[2]) != min(g[2]) for g in groups)
            if not cfg.dynamic_sampling or with_spread >= B or rounds == cfg.max_sample_rounds \
                    or position >= len(data) // B:
                break
        if cfg.dynamic_sampling:  # groups with a spread first, then tied ones, each in the order drawn
            groups = ([g for g in groups if max(g[2]) != min(g[2])] + [g for g in groups if max(g[2]) == min(g[2])])[:B]
        rows = [(prompt, c) for prompt, group, _ in groups for c in group]
        rewards = [r for _, _, group_rewards in groups for r in group_rewards]
        if cfg.overlong_buffer:  # DAPO eq. 13
            start = L - cfg.overlong_buffer
            rewards = [r - cfg.overlong_penalty * min(max(len(c) - start, 0), cfg.overlong_buffer) / cfg.overlong_buffer
                       for r, (_, c) in zip(rewards, rows)]
        advantages = naive_advantages(rewards, G, cfg.advantage)
        trained = [not cfg.mask_truncated or c[-1] in stop for _, c in rows]
        with torch.no_grad():
            old, old_entropy = zip(*[row_logprobs(policy, p, c, T, with_entropy=True) for p, c in rows])
            ref = [row_logprobs(reference, p, c, T) for p, c in rows]
        per_update = (cfg.minibatch_size or B) * G
        for _ in range(cfg.inner_epochs):
            for start in range(0, len(rows), per_update):
                update = range(start, start + per_update)
                kept = [torch.ones(len(old[n]), dtype=torch.bool) for n in update]
                if cfg.top_entropy_quantile < 1:  # Wang et al. 2025: the update's top-q tokens by entropy
                    threshold = torch.quantile(torch.cat([old_entropy[n] for n in update if trained[n]]),
                                               1 - cfg.top_entropy_quantile)
                    kept = [old_entropy[n] >= threshold for n in update]
                optimizer.zero_grad()
                sums, lengths, entropy_sum = [], [], 0.0
                for n, keep in zip(update, kept):
                    logp, entropy = row_logprobs(policy, *rows[n], T, with_entropy=True)
                    token_loss = naive_token_loss(cfg, logp, old[n], advantages[n]) * keep
                    token_loss = token_loss + cfg.beta * (torch.exp(ref[n] - logp) - (ref[n] - logp) - 1)
                    sums.append(token_loss.sum() * trained[n])
                    lengths.append(len(logp) * trained[n])
                    entropy_sum = entropy_sum + entropy.sum() * trained[n]
                if cfg.aggregation == "sequence_mean":  # GRPO: (1/G) Σ_i (1/|o_i|) Σ_t
                    loss = sum(s / n if n else 0 * s for s, n in zip(sums, lengths)) / len(sums)
                elif cfg.aggregation == "token_mean":  # DAPO: Σ_i Σ_t / Σ_i |o_i|
                    loss = sum(sums) / sum(lengths)
                else:  # Dr. GRPO: Σ_i Σ_t / (batch × max_new_tokens)
                    loss = sum(sums) / (len(sums) * cfg.max_new_tokens)
                loss = loss - cfg.entropy_coef * entropy_sum / sum(lengths)  # the mean entropy per trained token
                loss.backward()
                optimizer.step()
    return policy


def exact_reward(prompt, completion, example) -> float:
    """0/1 correctness: whole groups tie often (dynamic sampling has something to drop)."""
    return float(completion == example["answer"])


RECIPES = {
    "grpo": dict(),
    "grpo-micro-batches-temperature": dict(micro_batch_size=3, temperature=0.7, top_p=0.9),
    "dapo-mu2-minibatches-kl": dict(aggregation="token_mean", clip_high=0.28, inner_epochs=2, minibatch_size=2,
                                    micro_batch_size=5, beta=0.04),
    "dr-grpo-mu2": dict(advantage="none", aggregation="constant", inner_epochs=2, micro_batch_size=6),
    "batch-std": dict(advantage="batch_std", minibatch_size=1),
    "ppo-delta-mu2": dict(delta=1.25, inner_epochs=2, minibatch_size=2, clip_high=0.1, lr=0.5),
    "gspo-mu2-micro-batches": dict(policy_loss="gspo", clip_low=0.003, clip_high=0.004, inner_epochs=2,
                                   micro_batch_size=3),
    "cispo-token-mean-mu2": dict(policy_loss="cispo", aggregation="token_mean", clip_high=0.05, inner_epochs=2,
                                 minibatch_size=2, micro_batch_size=5),
    "sapo-mu2-kl": dict(policy_loss="sapo", sapo_tau_pos=2.0, sapo_tau_neg=3.0, inner_epochs=2, beta=0.04),
    "entropy-bonus-micro-batches": dict(entropy_coef=0.05, micro_batch_size=3),
    "top-entropy-minibatches": dict(top_entropy_quantile=0.2, minibatch_size=2, micro_batch_size=3,
                                    aggregation="token_mean"),
    "dapo-overlong-mask-truncated": dict(aggregation="token_mean", clip_high=0.28, overlong_buffer=2,
                                         overlong_penalty=0.5, mask_truncated=True, micro_batch_size=5),
    "dapo-dynamic-sampling": dict(aggregation="token_mean", clip_high=0.28, dynamic_sampling=True,
                                  max_sample_rounds=2, overlong_buffer=2, reward=exact_reward),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_updates_match_a_naive_loop_from_the_formulas(tmp_path, recipe):
    """Both sides in float64, so the bound holds on any CPU (float32 kernels round differently from one machine to
    the next, by 2e-5 here after three steps) and is tight: the update's smallest visible error, a gradient 1%
    off, moves the weights by ~1e-5, a million times the bound."""
    settings = {"lr": 0.2, **RECIPES[recipe]}
    reward = settings.pop("reward", digit_reward)
    trainer = make_rl_trainer(tmp_path, max_steps=3, model=make_lm(make_tokenizer()).double(), reward_fns=[reward],
                              **settings)
    sampler_state = trainer.sampling_generator.get_state()
    clip, outputs = [], []
    trainer.callbacks.append(LambdaCallback(on_batch_end=lambda t, o: (clip.append(float(o["policy/clip_frac"])),
                                                                       outputs.append(o))))
    trainer.fit()
    expected = naive_grpo(trainer.config, sampler_state, steps=3, reward=reward)
    initial = make_lm(make_tokenizer()).double().state_dict()
    moved = 0.0
    for name, value in expected.state_dict().items():
        got = trainer.unwrapped_model.state_dict()[name]
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, value, rtol=0, atol=1e-10, msg=lambda m: name + m)
        moved = max(moved, (value - initial[name]).abs().max().item())
    assert moved > 1e-3  # the updates did something that a wrong scale would show
    c = trainer.config
    if c.updates_per_step > 1 and c.policy_loss != "gspo":  # gspo's narrow clip on a sequence ratio: maybe never
        assert max(clip) > 0  # later updates of a step are off-policy: clipping is exercised
    if c.dynamic_sampling:  # the recipe exercises what it is about: extra rounds, and steps where they ran out
        assert max(o["rollout/sample_rounds"] for o in outputs) == 2
        assert [o["rollout/prompts_sampled"] for o in outputs] == [4 * o["rollout/sample_rounds"] for o in outputs]
    if c.mask_truncated:
        assert max(float(o["rollout/truncated_frac"]) for o in outputs) > 0
    if c.top_entropy_quantile < 1:
        assert all(0.15 < float(o["policy/pg_token_frac"]) < 0.35 for o in outputs)


# ---- the batch ----------------------------------------------------------------------------------------------


def test_rollout_batch_aligns_completions_weights_and_sampling_logprobs_by_hand():
    # two prompts of different lengths, G = 2; completions of 2, 1, 3 and 2 tokens (padding 0 after each)
    prompts, completions = [[1, 5, 6], [1, 5, 6], [1, 4], [1, 4]], [[7, 2], [2], [8, 9, 2], [9, 9]]
    logprobs = [[-.1, -.2], [-.3], [-.4, -.5, -.6], [-.7, -.8]]
    episodes = Episodes.from_lists([p + c for p, c in zip(prompts, completions)],
                                   [[False] * len(p) + [True] * len(c) for p, c in zip(prompts, completions)],
                                   [[0.0] * len(p) + lp for p, lp in zip(prompts, logprobs)], [3, 3, 2, 2], [1] * 4,
                                   [True] * 4, [True, True, True, False], [0.0] * 4, ["a", "a", "b", "b"],
                                   metrics={}, group_size=2, pad_id=0)
    batch = rollout_batch(episodes, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    # row 0: tokens 1 5 6 | 7 2  -> input 1 5 6 7, targets 5 6 7 2, trained: the targets 7 and 2
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7], [1, 5, 6, 0], [1, 4, 8, 9], [1, 4, 9, 0]]
    assert batch["target_tokens"].tolist() == [[5, 6, 7, 2], [5, 6, 2, 0], [4, 8, 9, 2], [4, 9, 9, 0]]
    assert batch["weights"].tolist() == [[0, 0, 1, 1], [0, 0, 1, 0], [0, 1, 1, 1], [0, 1, 1, 0]]
    torch.testing.assert_close(batch["sampling_logprobs"], torch.tensor(
        [[0, 0, -.1, -.2], [0, 0, -.3, 0], [0, -.4, -.5, -.6], [0, -.7, -.8, 0]]))
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3]] * 4
    assert batch["advantages"].tolist() == [1.0, -1.0, 0.5, -0.5]
    # micro-batches of 2 rows, each cut to its own longest trained row
    first, second = split_rows(batch, 2)
    assert first["input_ids"].shape == (2, 4) and second["input_ids"].shape == (2, 4)
    short = split_rows({k: v[1:2] for k, v in batch.items()}, 1)[0]
    assert short["input_ids"].tolist() == [[1, 5, 6]] and short["advantages"].tolist() == [-1.0]


# ---- configuration and inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, key", [
    (dict(grad_accum_steps=2), "grad_accum_steps"), (dict(num_generations=1), "num_generations"),
    (dict(minibatch_size=3), "minibatch_size"), (dict(advantage="grpo"), "advantage"),
    (dict(aggregation="mean"), "aggregation"), (dict(temperature=0.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(clip_low=1.0), "clip_low"), (dict(inner_epochs=0), "inner_epochs"),
    (dict(beta=-0.1), "beta"), (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(delta=1.1), "delta"), (dict(clip_high=0.3, delta=1.3), "delta"), (dict(sapo_tau_neg=0.0), "sapo_tau_neg"),
    (dict(policy_loss="grpo"), "policy_loss"), (dict(entropy_coef=-0.1), "entropy_coef"),
    (dict(top_entropy_quantile=0.0), "top_entropy_quantile"), (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
    (dict(dynamic_sampling=True), "max_steps"), (dict(max_sample_rounds=0), "max_sample_rounds"),
    (dict(overlong_buffer=-1), "overlong_buffer"), (dict(overlong_buffer=65), "overlong_buffer"),
    (dict(overlong_penalty=-1.0), "overlong_penalty"), (dict(eval_num_generations=-1), "eval_num_generations"),
    (dict(eval_temperature=0.0), "eval_temperature"), (dict(eval_pass_threshold=math.inf), "eval_pass_threshold"),
    (dict(top_entropy_quantile=0.2, policy_loss="gspo"), "top_entropy_quantile"), (dict(max_turns=0), "max_turns"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        RLConfig(batch_size=4, **overrides)


def test_reward_function_errors_name_the_function_and_the_example(tmp_path):
    def flaky(prompt, completion, example):
        if example["answer"] == "9":
            raise KeyError("no such key")
        return 0.0

    def nan_reward(prompt, completion, example):
        return float("nan")

    for fn, error, words in ((flaky, RuntimeError, ["'flaky' raised KeyError", "train example"]),
                             (nan_reward, ValueError, ["'nan_reward' returned nan", "finite number"]),
                             (lambda p, c, e: None, ValueError, ["'<lambda>' returned None"])):
        trainer = make_rl_trainer(tmp_path, max_steps=6, reward_fns=[fn])
        with pytest.raises(error) as info:
            trainer.fit()
        for word in words:
            assert word in str(info.value)
    index = int(str(info.value).split("train example ")[1].split()[0])
    assert make_prompts()[index]["prompt"] in str(info.value)  # names the very example
    with pytest.raises(ValueError, match="reward_weights"):
        RLTrainer(make_lm(make_tokenizer()), RLConfig(), tokenizer=make_tokenizer(), train_data=make_prompts(),
                  reward_fns=[digit_reward], reward_weights=[1.0, 2.0])
    bad = make_prompts()
    bad[5] = {"question": "1+1="}
    for train, val, where in ((bad, None, "train_data example 5"),
                              (make_prompts(), [{"prompt": ""}], "val_data example 0")):
        with pytest.raises(ValueError, match=rf"{where}: an RL prompt .* got"):  # at construction, not hours in
            RLTrainer(make_lm(make_tokenizer()), RLConfig(output_dir=str(tmp_path)), tokenizer=make_tokenizer(),
                      train_data=train, val_data=val, reward_fns=[digit_reward])


def test_dropout_is_off_so_training_scores_the_sampled_log_probs(tmp_path):
    outputs = []
    model = tiny_causal_lm(len(make_tokenizer()), hidden_size=32, num_layers=2, num_heads=2, seed=0,
                           initializer_range=0.2, attention_dropout=0.5)
    trainer = make_rl_trainer(tmp_path, model=model, max_steps=1, inner_epochs=2,
                              callbacks=[LambdaCallback(on_batch_end=lambda t, o: outputs.append(o))])
    trainer.fit()
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.3), torch.nn.Dropout1d(0.2))
    disable_dropout(plain)  # what GPT-2-style models hold: dropout modules
    assert [m.p for m in plain if isinstance(m, torch.nn.modules.dropout._DropoutNd)] == [0.0, 0.0]
    assert float(outputs[0]["policy/sampler_logprob_gap"]) < 1e-5  # with dropout 0.5 in training: about 1


def test_stop_tokens_include_the_models_configured_eos(tmp_path):
    tok = make_tokenizer()
    model = make_lm(tok)
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("=")]
    trainer = RLTrainer(model, RLConfig(output_dir=str(tmp_path)), tokenizer=tok, train_data=make_prompts(),
                        reward_fns=[digit_reward])
    assert trainer.stop_token_ids == sorted([tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>"),
                                             tok.convert_tokens_to_ids("=")])


def test_the_reward_is_the_weighted_sum_of_the_reward_functions(tmp_path):
    def length(prompt, completion, example):
        return float(len(completion))

    outputs = []
    trainer = make_rl_trainer(tmp_path, max_steps=2, reward_fns=[digit_reward, length], reward_weights=[1.0, 0.5],
                              callbacks=[LambdaCallback(on_batch_end=lambda t, o: outputs.append(o))])
    trainer.fit()
    for o in outputs:
        assert float(o["reward/length"]) > 0
        weighted = float(o["reward/digit_reward"]) + 0.5 * float(o["reward/length"])
        assert float(o["reward/mean"]) == pytest.approx(weighted, rel=1e-6)


def test_groups_with_equal_rewards_contribute_nothing(tmp_path):
    outputs = []
    trainer = make_rl_trainer(tmp_path, max_steps=2, reward_fns=[lambda prompt, completion, example: 0.5],
                              callbacks=[LambdaCallback(on_batch_end=lambda t, o: outputs.append(o))])
    before = copy.deepcopy(trainer.unwrapped_model.state_dict())
    trainer.fit()
    assert [float(o["rollout/zero_std_frac"]) for o in outputs] == [1.0, 1.0]
    for name, value in trainer.unwrapped_model.state_dict().items():
        assert torch.equal(value, before[name]), name  # SGD, no KL: a zero gradient leaves the weights alone


def test_a_schedule_spans_every_update_of_every_step(tmp_path):
    lrs = []
    record = LambdaCallback(on_batch_end=lambda t, o: lrs.append(t.scheduler.get_last_lr()[0]))
    trainer = make_rl_trainer(tmp_path, max_steps=3, inner_epochs=2, minibatch_size=2, lr_scheduler="linear",
                              callbacks=[record])
    assert trainer.total_updates() == 3 * 2 * 2
    trainer.fit()
    assert trainer.state.updates == 12
    assert lrs == pytest.approx([0.05 * (1 - u / 12) for u in (4, 8, 12)])  # reaches 0 at the last update, not before


def test_outputs_hold_every_metric_and_sampled_completions_as_text(tmp_path):
    outputs = []
    trainer = make_rl_trainer(tmp_path, max_steps=1, beta=0.1, callbacks=[LambdaCallback(
        on_batch_end=lambda t, o: outputs.append(o))])
    trainer.fit()
    (o,) = outputs
    for key in ("train/loss", "reward/mean", "reward/std", "reward/digit_reward",
                "rollout/zero_std_frac", "rollout/completion_len", "rollout/stopped_frac", "policy/clip_frac",
                "policy/kl", "policy/entropy", "policy/ratio_mean", "policy/sampler_logprob_gap", "time/generate_s",
                "time/train_s",
                "perf/completions_per_s", "optim/lr", "optim/grad_norm"):
        assert key in o and torch.isfinite(torch.as_tensor(o[key])), key
    assert float(o["policy/ratio_mean"]) == 1.0 and float(o["policy/kl"]) == 0.0  # one update: on-policy, ref = policy
    assert 0 <= float(o["policy/sampler_logprob_gap"]) < 1e-5  # sampler and trainer agree to float32 noise
    assert 1 <= float(o["rollout/completion_len"]) <= 5
    lines = o["text/samples"].splitlines()
    assert lines[0] == "| prompt | completion | reward |" and len(lines) == 4  # log_completions=2
    prompt = lines[2].split(" | ")[0].removeprefix("| ")
    assert any(p["prompt"] == prompt for p in make_prompts())


def test_training_forwards_run_without_a_kv_cache(tmp_path):
    calls = []
    trainer = make_rl_trainer(tmp_path, max_steps=1, inner_epochs=2, beta=0.1)
    hook = lambda module, args, kwargs: calls.append((torch.is_inference_mode_enabled(), kwargs.get("use_cache")))
    trainer.unwrapped_model.register_forward_pre_hook(hook, with_kwargs=True)
    trainer.reference.register_forward_pre_hook(hook, with_kwargs=True)
    trainer.fit()
    scoring = [use_cache for sampling, use_cache in calls if not sampling]
    assert len(scoring) == 1 + 1 + 2  # old log-probs, reference, two updates: one micro-batch each
    assert scoring == [False] * 4
    assert all(use_cache for sampling, use_cache in calls if sampling)  # generation does use its cache


def test_reference_is_the_frozen_initial_policy_and_not_checkpointed(tmp_path):
    assert make_rl_trainer(tmp_path / "none", beta=0.0).reference is None
    trainer = make_rl_trainer(tmp_path / "kl", beta=0.1, max_steps=3, checkpoint_every_steps=3)
    initial = make_lm(make_tokenizer()).state_dict()
    trainer.fit()
    assert all(not p.requires_grad for p in trainer.reference.parameters())
    for name, value in trainer.reference.state_dict().items():
        assert torch.equal(value, initial[name])
    state = trainer.state_dict()
    assert all(not key.startswith("reference") for key in state["model"])
    # resumed with trained weights as "the initial model", the reference would silently move: refused
    wrong = make_rl_trainer(tmp_path / "kl", beta=0.1, max_steps=6, model=copy.deepcopy(trainer.unwrapped_model))
    with pytest.raises(CheckpointError, match="reference model"):
        wrong.fit(resume="latest")
    make_rl_trainer(tmp_path / "kl", beta=0.1, max_steps=6).fit(resume="latest")  # the right one resumes


# ---- exact resume ------------------------------------------------------------------------------------------

_straight = {}


def straight_run(run, tmp_path_factory):
    if run not in _straight:
        trainer = make_rl_trainer(tmp_path_factory.mktemp(run), **RESUME_RUNS[run])
        trainer.fit()
        _straight[run] = trainer
    return _straight[run]


def assert_same_run(resumed, reference):
    assert (resumed.state.global_step, resumed.state.updates) == (reference.state.global_step,
                                                                  reference.state.updates)
    for name, value in reference.unwrapped_model.state_dict().items():
        assert torch.equal(resumed.unwrapped_model.state_dict()[name], value), name
    assert torch.equal(resumed.sampling_generator.get_state(), reference.sampling_generator.get_state())
    assert resumed.state.train_loss_history == reference.state.train_loss_history


@pytest.mark.parametrize("run, kill, checkpoint", [
    ("mu1", ["--kill-at-step", "5"], "step-000004"),        # between rollout batches
    ("mu1", ["--kill-in-generate", "7"], "step-000006"),    # in the middle of sampling step 8's completions
    ("mu2", ["--kill-in-generate", "3"], "step-000002"),    # in the middle of sampling step 4's completions
    ("mu2", ["--kill-after-update", "14"], "step-000002"),  # after update 2 of step 4's 4
    ("dapo", ["--kill-at-step", "3"], "step-000002"),        # dynamic sampling: between steps
    ("dapo", ["--kill-in-generate", "2", "--kill-in-round", "2"], "step-000002"),  # in step 3's second round
    ("dapo", ["--kill-in-generate", "4", "--kill-in-round", "3"], "step-000004"),  # in step 5's third and last
])
def test_sigkill_anywhere_then_resume_is_bitwise_identical(tmp_path, tmp_path_factory, run, kill, checkpoint):
    proc = run_worker(WORKER, "--out", tmp_path, "--run", run, *kill, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert committed(tmp_path / "checkpoints")[0].name == checkpoint
    resumed = make_rl_trainer(tmp_path, **RESUME_RUNS[run])
    resumed.fit(resume="latest")
    assert_same_run(resumed, straight_run(run, tmp_path_factory))


# ---- two processes -----------------------------------------------------------------------------------------


def test_two_processes_match_one_with_the_same_global_batch_and_resume_exactly(tmp_path):
    """token_mean's normalizer (all-reduced) and batch_std's advantages (gathered) both span the processes: 2 x 2
    prompts end where 1 x 4 prompts end. A DDP run stopped with a checkpoint resumes bitwise (each process's own
    sampling stream restored)."""
    proc = run_worker(DDP_WORKER, "--out", tmp_path, processes=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = load_file(str(tmp_path / "layout_free.safetensors"))
    single = make_rl_trainer(tmp_path / "single", cls=LayoutFreeEpisodes, **DDP_RUN)
    single.fit()
    moved = 0.0
    for name, value in single.unwrapped_model.state_dict().items():
        torch.testing.assert_close(ddp[name], value, rtol=0, atol=1e-5)
        moved = max(moved, (value - make_lm(make_tokenizer()).state_dict()[name]).abs().max().item())
    assert moved > 1e-3
    straight, resumed = (load_file(str(tmp_path / f"{name}.safetensors")) for name in ("straight", "resumed"))
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name
    # Dynamic sampling decides on every process's rewards and deals the kept groups out in draw order: 2 processes
    # keep and train the groups 1 process does.
    ddp = load_file(str(tmp_path / "layout_free_dapo.safetensors"))
    rounds = []
    single = make_rl_trainer(tmp_path / "single_dapo", cls=LayoutFreeEpisodes, **{**DDP_RUN, **DDP_DAPO}, callbacks=[
        LambdaCallback(on_batch_end=lambda t, o: rounds.append(o["rollout/sample_rounds"]))])
    single.fit()
    assert max(rounds) == 2  # some step drew a second round
    for name, value in single.unwrapped_model.state_dict().items():
        torch.testing.assert_close(ddp[name], value, rtol=0, atol=1e-5)
    # ... and so with a multi-turn environment: episodes gathered for the filter and dealt out the same way
    ddp = load_file(str(tmp_path / "layout_free_env.safetensors"))
    outputs = []
    single = make_rl_trainer(tmp_path / "single_env", cls=LayoutFreeEpisodes, **{**DDP_RUN, **DDP_ENV}, callbacks=[
        LambdaCallback(on_batch_end=lambda t, o: outputs.append(o))])
    single.fit()
    assert max(o["rollout/sample_rounds"] for o in outputs) == 2 and max(o["rollout/turns_mean"] for o in outputs) > 1
    moved = 0.0
    for name, value in single.unwrapped_model.state_dict().items():
        torch.testing.assert_close(ddp[name], value, rtol=0, atol=1e-5)
        moved = max(moved, (value - make_lm(make_tokenizer()).state_dict()[name]).abs().max().item())
    assert moved > 1e-3


def test_chat_prompts_render_the_generation_prompt_and_stop_at_end_of_turn(tmp_path):
    trainer = make_rl_trainer(tmp_path, max_steps=1)
    tok = trainer.tokenizer
    ids = prompt_ids([{"role": "user", "content": "1+2="}], tok)
    assert tok.decode(ids) == "<bos><|user|>1+2=<|end|><|assistant|>"
    assert prompt_ids("1+2=", tok) == tok("1+2=")["input_ids"]
    assert trainer.stop_token_ids == [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")]
    chats = [{"messages": [{"role": "user", "content": p["prompt"]}], "answer": p["answer"]} for p in make_prompts()]
    seen = []
    chat_trainer = RLTrainer(make_lm(tok), RLConfig(batch_size=4, num_generations=4, max_new_tokens=5, max_steps=1,
                                                   output_dir=str(tmp_path / "chat")), tokenizer=tok, train_data=chats,
                             reward_fns=[lambda prompt, completion, example: seen.append(prompt) or 0.0])
    chat_trainer.fit()
    assert seen[0] == chats[int(epoch_permutation(24, 0, 0)[0])]["messages"]  # reward functions get the messages


def test_validation_scores_greedy_completions_of_the_validation_prompts(tmp_path):
    trainer = make_rl_trainer(tmp_path)
    trainer.val_data = make_prompts(10, seed=3)
    metrics = trainer.validate()
    tok, model = trainer.tokenizer, trainer.unwrapped_model
    expected, lengths = [], []
    for example in trainer.val_data:  # greedy, one prompt at a time, by hand
        ids = tok(example["prompt"], return_tensors="pt")["input_ids"]
        out = model.generate(ids, do_sample=False, max_new_tokens=5, eos_token_id=trainer.stop_token_ids,
                             pad_token_id=0)[0, ids.shape[1]:].tolist()
        out = out[:next((i + 1 for i, t in enumerate(out) if t in trainer.stop_token_ids), len(out))]
        expected.append(digit_reward(None, tok.decode(out, skip_special_tokens=True), example))
        lengths.append(len(out))
    assert metrics["val/reward"] == pytest.approx(sum(expected) / 10, abs=1e-6)
    assert metrics["val/reward/digit_reward"] == pytest.approx(sum(expected) / 10, abs=1e-6)
    assert metrics["val/completion_len"] == pytest.approx(sum(lengths) / 10)


def test_bf16_autocast_trains_with_finite_outputs(tmp_path):
    outputs = []
    trainer = make_rl_trainer(tmp_path, max_steps=2, precision="bf16", inner_epochs=2, beta=0.1,
                              callbacks=[LambdaCallback(on_batch_end=lambda t, o: outputs.append(o))])
    trainer.fit()
    assert trainer.state.updates == 4 and all(o["train/finite"] for o in outputs)
    for key in ("train/loss", "policy/entropy", "policy/kl", "policy/sampler_logprob_gap"):
        assert all(torch.isfinite(torch.as_tensor(o[key])) for o in outputs), key
    # the sampler runs in float32, the training forward in bfloat16: the gap shows bf16's precision, not 1e-7
    assert 1e-5 < float(outputs[0]["policy/sampler_logprob_gap"]) < 0.1


# ---- the shared language-model layer: LoRA and the tokenizer in checkpoints ------------------------------


def lora_rl_trainer(out, callbacks=(), **cfg):
    pytest.importorskip("peft")
    return make_rl_trainer(out, callbacks, prompts=16, max_steps=4, checkpoint_every_steps=2, inner_epochs=2,
                           minibatch_size=2, beta=0.04, lr=0.2, lora={"r": 4, "alpha": 8}, **cfg)


def test_gradient_checkpointing_with_lora_trains_the_same_adapters(tmp_path):
    """Rollouts sample without it (no gradient), the updates recompute each layer: the adapters after four steps
    (two updates each, a reference forward) are bitwise those of the run without checkpointing, and moved."""
    plain = lora_rl_trainer(tmp_path / "plain")
    plain.fit()
    checkpointed = lora_rl_trainer(tmp_path / "checkpointed", gradient_checkpointing=True)
    assert checkpointed.unwrapped_model.get_base_model().model.layers[0].gradient_checkpointing
    checkpointed.fit()
    adapters = {k: v for k, v in checkpointed.unwrapped_model.state_dict().items() if "lora_B" in k}
    assert adapters and max(v.abs().max().item() for v in adapters.values()) > 0
    assert_bitwise_equal(weights(checkpointed.unwrapped_model), weights(plain.unwrapped_model))


def test_lora_dropout_under_disable_dropout_is_switched_off_and_said(tmp_path, caplog):
    import logging

    pytest.importorskip("peft")
    with caplog.at_level(logging.WARNING):
        trainer = make_rl_trainer(tmp_path, lora={"r": 4, "alpha": 8, "dropout": 0.1})
    assert "lora.dropout=0.1 is switched off" in caplog.text
    dropouts = [m for m in trainer.unwrapped_model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0 for m in dropouts)


def test_rl_with_lora_trains_only_adapters_checkpoints_only_them_and_resumes_bitwise(tmp_path):
    straight, resumed = straight_and_resumed(lora_rl_trainer, tmp_path, stop_at=2)
    trained = {n for n, p in straight.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    initial = make_lm(make_tokenizer()).state_dict()
    moved = 0.0
    for name, value in straight.unwrapped_model.state_dict().items():
        if "lora_" in name:
            moved = max(moved, value.abs().max().item()) if "lora_B" in name else moved
        else:  # every base weight is as it was built
            assert torch.equal(value, initial[name.replace("base_model.model.", "").replace(".base_layer", "")]), name
    assert moved > 0  # the adapters trained (lora_B starts at 0)
    checkpoint = committed(tmp_path / "straight" / "checkpoints")[0]
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files and "model.safetensors" not in files
    assert_same_run(resumed, straight)
    # The reference is the base itself, adapters off (no copy): its log-probs are the untouched initial model's.
    assert straight.reference is None
    batch = next(iter(straight.plan.steps()))
    rollouts = straight.rollout(torch.cat(batch.micro_batches))
    rows = rollouts.batch(torch.zeros(len(rollouts.episodes)))
    with torch.no_grad():
        base_logprobs = torch.log_softmax(make_lm(make_tokenizer())(
            input_ids=rows["input_ids"], position_ids=rows["position_ids"], use_cache=False).logits, -1)
        expected = base_logprobs.gather(-1, rows["target_tokens"][..., None])[..., 0]
        weights = rows["weights"]  # the completion tokens: the only ones scored
        torch.testing.assert_close(straight.reference_logprobs(rows) * weights, expected * weights, rtol=0, atol=1e-6)
        trained_logprobs = straight.forward(rows)[0]
    assert ((trained_logprobs - expected) * weights).abs().max() > 1e-3  # the policy moved away from its reference


def test_rl_checkpoints_hold_the_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    trainer = make_rl_trainer(tmp_path, max_steps=1, checkpoint_every_steps=1)
    trainer.fit()
    tok = AutoTokenizer.from_pretrained(committed(tmp_path / "checkpoints")[0])
    assert tok("12+7=")["input_ids"] == make_tokenizer()("12+7=")["input_ids"]
    assert tok.apply_chat_template([{"role": "user", "content": "1"}], tokenize=False) == \
        make_tokenizer().apply_chat_template([{"role": "user", "content": "1"}], tokenize=False)


def test_a_resume_with_other_rewards_prompts_or_sampling_is_refused_naming_what_differs(tmp_path):
    from paperloop import CheckpointError

    stop = StopAt(2)
    make_rl_trainer(tmp_path, callbacks=[stop], max_steps=4, checkpoint_every_steps=2).fit()

    def length(prompt, completion, example):
        return float(len(completion))

    for words, change in {"reward_fns": dict(reward_fns=[length]), "train_data": dict(prompt_seed=7),  # same count
                          "config: num_generations": dict(num_generations=2),
                          "config: temperature": dict(temperature=0.5), "config: beta": dict(beta=0.04)}.items():
        trainer = make_rl_trainer(tmp_path, max_steps=4, checkpoint_every_steps=2, **change)
        with pytest.raises(CheckpointError, match=words):
            trainer.fit(resume="latest")
    make_rl_trainer(tmp_path, max_steps=4, checkpoint_every_steps=2, micro_batch_size=3).fit(resume="latest")


def test_prompt_metadata_and_stop_ids_are_fingerprinted_by_their_content(tmp_path):
    """Answers JSON cannot write (a Fraction, a set, bytes, a Path, a tensor) count by their value: other answers
    of the same count are another run, and the same ones (in a new process: no memory address) the same run."""
    import fractions
    import pathlib

    def fingerprints(answer, stop_token_ids=None):
        prompts = [{"prompt": "1+2=", "answer": answer}, {"prompt": "3+4=", "answer": "7"}]
        trainer = RLTrainer(make_lm(make_tokenizer()), RLConfig(batch_size=2, num_generations=2, max_new_tokens=2,
                                                                output_dir=str(tmp_path)),
                            tokenizer=make_tokenizer(), train_data=prompts, reward_fns=[digit_reward],
                            stop_token_ids=stop_token_ids)
        return trainer.compute_fingerprints()

    def fingerprint(answer):
        return fingerprints(answer)["train_data"]

    pairs = [(fractions.Fraction(1, 3), fractions.Fraction(2, 3)), ({1, 2}, {1, 3}), (b"\x01", b"\x02"),
             (pathlib.Path("a"), pathlib.Path("b")), (torch.tensor([1.0]), torch.tensor([2.0]))]
    for one, other in pairs:
        assert fingerprint(one) != fingerprint(other), (one, other)
        assert fingerprint(one) == fingerprint(copy.deepcopy(one)), one
    assert fingerprint({3, 1, 2}) == fingerprint({2, 3, 1})
    stops = [fingerprints("3", ids)["stop_token_ids"] for ids in ([2, 5], [5, 2], [2, 6])]
    assert stops[0] == stops[1] != stops[2]  # the same set of stop ids, in another order, is the same run


def test_what_cannot_train_is_refused_when_the_trainer_is_built_naming_it(tmp_path, caplog):
    """Checked at construction, each naming what is wrong, instead of failing inside torch hours in."""
    import logging

    from transformers import GPT2Config, GPT2LMHeadModel
    from tokenizers import processors

    tok = make_tokenizer()
    build = lambda **kw: RLTrainer(kw.pop("model", make_lm(tok)), RLConfig(output_dir=str(tmp_path),  # noqa: E731
                                                                           **kw.pop("config", {})),
                                   tokenizer=kw.pop("tokenizer", tok), train_data=kw.pop("train_data", make_prompts()),
                                   reward_fns=[digit_reward])
    no_role = make_prompts()
    no_role[3] = {"messages": [{"content": "1+1="}]}
    with pytest.raises(ValueError, match=r"train_data example 3, message 0: expected a dict with 'role'"):
        build(train_data=no_role)
    # A whitespace-mode tokenizer of the same vocabulary and no BOS: whitespace alone holds no word (the
    # per-character one keeps every character, a space too)
    no_bos = word_level_tokenizer(DIGITS)
    no_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    empty = make_prompts()
    empty[2] = {"prompt": "   ", "answer": "0"}
    with pytest.raises(ValueError, match="train_data example 2: its prompt tokenizes to no tokens"):
        build(tokenizer=no_bos, train_data=empty)
    bare = make_tokenizer()
    bare.pad_token, bare.eos_token = None, None
    with pytest.raises(ValueError, match="neither a pad_token nor an eos_token"):
        build(tokenizer=bare)
    small = tiny_causal_lm(len(tok) - 3, hidden_size=32, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match=f"model: its input embedding has {len(tok) - 3} rows but the tokenizer"):
        build(model=small)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=8, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="is 9 positions, more than the model's max_position_embeddings=8: its "
                                         "learned position table"):
        build(model=gpt2, config=dict(max_new_tokens=4))  # "1+2=" with BOS is 5 tokens
    with caplog.at_level(logging.WARNING):
        build(model=make_lm(tok), config=dict(max_new_tokens=600))  # rotary positions: a warning, not an error
    assert "more than the model's max_position_embeddings=512: its rotary positions go on" in caplog.text
    with pytest.raises(ConfigError, match="^temperature: must be >= 0.0001"):
        RLConfig(temperature=1e-40)


def test_reward_values_are_one_finite_number_in_float32s_range_whatever_their_type(tmp_path):
    import numpy as np

    from paperloop.lm import call_scorer

    for value, expected in ((True, 1.0), (np.bool_(False), 0.0), (np.float32(0.5), 0.5), (torch.tensor(2.0), 2.0),
                            (torch.tensor([3]), 3.0), (7, 7.0)):
        assert call_scorer(lambda: value, name="r", where="x") == expected
    for value in (1e39, 10 ** 400, float("inf"), torch.tensor([1.0, 2.0]), "1", None, np.array([1, 2])):
        with pytest.raises(ValueError, match="a score is a finite number"):
            call_scorer(lambda: value, name="r", where="x")


def test_a_reward_function_that_edits_its_example_does_not_edit_the_training_data(tmp_path):
    def vandal(prompt, completion, example):
        example["answer"] = "changed"
        return 0.0 if completion else 1.0

    trainer = make_rl_trainer(tmp_path, max_steps=2, reward_fns=[vandal, digit_reward])
    before = copy.deepcopy(list(trainer.train_data))
    trainer.fit()
    assert list(trainer.train_data) == before


def test_each_process_samples_its_own_stream(tmp_path, monkeypatch):
    """The sampling generator is seeded by (run seed, rank): with the rank left out, every DDP process would draw
    the same completions of its prompts, and a 2-process run would see half the variety it pays for."""
    from paperloop.rl.trainer import sampling_seed

    import paperloop.base as base

    trainer = make_rl_trainer(tmp_path)
    assert trainer.sampling_generator.initial_seed() == sampling_seed(0, 0)
    assert len({sampling_seed(0, rank) for rank in range(8)} | {sampling_seed(1, 0)}) == 9

    class Rank1:  # the process of rank 1, as far as the trainer's construction reads it
        def __init__(self, accelerator):
            self._accelerator = accelerator

        def __getattr__(self, name):
            return getattr(self._accelerator, name)

        process_index, is_main_process = 1, False

    real = base.make_accelerator
    monkeypatch.setattr(base, "make_accelerator", lambda: Rank1(real()))
    second = make_rl_trainer(tmp_path / "rank1")
    assert second.rank == 1 and second.sampling_generator.initial_seed() == sampling_seed(0, 1)
    prompt = [prompt_ids(make_prompts()[0]["prompt"], make_tokenizer())]
    drawn = [trainer.generate(prompt, 16, max_new_tokens=5, temperature=1.0,
                              generator=torch.Generator().manual_seed(sampling_seed(0, rank))).completions()
             for rank in (0, 1)]
    assert drawn[0] != drawn[1]


def test_a_trainer_for_validation_alone_needs_no_training_prompts(tmp_path):
    trainer = RLTrainer(make_lm(make_tokenizer()), RLConfig(output_dir=str(tmp_path), max_new_tokens=3),
                        tokenizer=make_tokenizer(), val_data=make_prompts(4), reward_fns=[digit_reward])
    assert set(trainer.validate()) == {"val/reward", "val/reward/digit_reward", "val/completion_len"}


# ---- sampled evaluation ------------------------------------------------------------------------------------


def test_sampled_validation_reports_unbiased_pass_at_k_from_its_own_stream(tmp_path):
    """val/pass@k from n sampled completions per prompt equals the exact combinatorial pass@k of the rewards the
    reward function gave them; the samples come from a stream of the evaluation's own: a run that validates every
    step trains exactly as one that never does, and validating twice at a step gives the same numbers."""
    scored = []

    def recording(prompt, completion, example):
        scored.append(first_digit_reward(prompt, completion, example))
        return scored[-1]

    trainer = make_rl_trainer(tmp_path / "a", reward_fns=[recording], eval_num_generations=6, batch_size=4,
                              val_every_steps=1, max_steps=3, max_epochs=None, val_data=make_prompts(6, seed=3))
    del scored[:]
    metrics = trainer.validate()
    assert sorted(k for k in metrics if "pass@" in k) == ["val/pass@1", "val/pass@2", "val/pass@4", "val/pass@6"]
    # batches of 4 then 2 prompts: each scores its greedy completions, then 6 samples per prompt
    sampled = scored[4:4 + 24] + scored[4 + 24 + 2:]
    assert len(scored) == 4 + 24 + 2 + 12
    correct = [int(sum(sampled[p * 6:(p + 1) * 6])) for p in range(6)]
    assert 0 < sum(correct) < 36  # some pass, some fail: the estimator is exercised
    for k in (1, 2, 4, 6):
        exact = sum(1 - math.comb(6 - c, k) / math.comb(6, k) for c in correct) / 6
        assert metrics[f"val/pass@{k}"] == pytest.approx(exact, abs=1e-12)
    assert metrics["val/reward_mean"] == pytest.approx(sum(sampled) / 36)
    assert metrics["val/pass@1"] == pytest.approx(metrics["val/reward_mean"])  # 0/1 rewards, threshold 1
    assert trainer.validate() == metrics

    stream = trainer.sampling_generator.get_state()
    trainer.fit()
    plain = make_rl_trainer(tmp_path / "b", reward_fns=[first_digit_reward], batch_size=4, max_steps=3,
                            max_epochs=None)
    assert torch.equal(plain.sampling_generator.get_state(), stream)  # validating took nothing from it
    plain.fit()
    assert [h["step"] for h in trainer.state.val_history] == [1, 2, 3]
    assert torch.equal(plain.sampling_generator.get_state(), trainer.sampling_generator.get_state())
    for name, value in plain.unwrapped_model.state_dict().items():
        assert torch.equal(trainer.unwrapped_model.state_dict()[name], value), name


def test_pass_threshold_decides_what_passes_and_model_checkpoint_keeps_the_best_pass_at_1(tmp_path):
    from paperloop.callbacks import ModelCheckpoint

    keeper = ModelCheckpoint(monitor="val/pass@1", mode="max", every_n_epochs=None, every_n_steps=1, save_top_k=1)
    trainer = make_rl_trainer(tmp_path, eval_num_generations=4, eval_pass_threshold=-0.03, max_steps=3,
                              max_epochs=None, val_every_steps=1, callbacks=[keeper], val_data=make_prompts(4, seed=5))
    trainer.fit()
    history = [h["val/pass@1"] for h in trainer.state.val_history]
    assert len(history) == 3 and max(history) > 0  # digit_reward >= -0.03: short wrong answers pass too
    best = max(range(3), key=lambda i: (history[i], -i))
    assert keeper.best[0][0] == pytest.approx(history[best])
    strict = make_rl_trainer(tmp_path / "strict", eval_num_generations=4, eval_pass_threshold=2.0)
    strict.val_data = trainer.val_data
    assert strict.validate()["val/pass@4"] == 0  # no digit_reward reaches 2


# ---- rollouts you can read ---------------------------------------------------------------------------------


def test_rollout_records_hold_each_completions_rewards_shaping_advantage_and_ending(tmp_path):
    seen, outputs = [], []
    trainer = make_rl_trainer(tmp_path, max_steps=1, max_epochs=None, log_completions=16, overlong_buffer=2,
                              overlong_penalty=0.5, callbacks=[LambdaCallback(on_batch_end=lambda t, o: outputs.append(o))])
    play = trainer.play
    trainer.play = lambda *args, **kwargs: seen.append(play(*args, **kwargs)) or seen[-1]
    trainer.fit()
    records = outputs[0]["records/rollouts"]
    assert len(records) == 16 and json.loads(json.dumps(records)) == records  # JSON as it is
    rewards = seen[0].rewards_N_F[:, 0].tolist()
    # a truncated completion ran the whole budget; one token per character, so the text (special tokens skipped)
    # is never longer than the completion
    assert all(r["length"] == 5 for r in records if r["truncated"])
    assert all(len(r["completion"]) + r["stopped"] <= r["length"] <= 5 for r in records)
    assert [r["truncated"] for r in records] == [not r["stopped"] for r in records]
    assert any(r["truncated"] for r in records) and any(r["stopped"] for r in records)
    shaped = [reward - 0.5 * min(max(r["length"] - 3, 0), 2) / 2 for reward, r in zip(rewards, records)]
    assert [r["rewards"] for r in records] == [{"digit_reward": reward} for reward in rewards]
    assert [r["reward"] for r in records] == pytest.approx(shaped)
    assert [r["advantage"] for r in records] == pytest.approx(naive_advantages(shaped, 4, "group_std"), abs=1e-6)
    prompts = make_prompts()
    order = epoch_permutation(24, 0, 0)[:4].tolist()
    assert [r["prompt"] for r in records] == [prompts[i]["prompt"] for i in order for _ in range(4)]
    assert float(outputs[0]["reward/overlong_penalty"]) == pytest.approx(sum(shaped) / 16 - sum(rewards) / 16)
    assert float(outputs[0]["rollout/truncated_frac"]) == pytest.approx(sum(r["truncated"] for r in records) / 16)
