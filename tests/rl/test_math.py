"""paperloop.rl: advantages, the policy losses (PPO's clip with delta, GSPO, CISPO, SAPO) and their aggregations, the
entropy bonus and mask, DAPO's shaping, pass@k — against hand-computed cases, naive per-element loops written
from the papers' formulas, and exact combinatorics."""

import math
import statistics
from fractions import Fraction

import numpy as np
import pytest
import torch

from paperloop.rl import (AGGREGATIONS, ADVANTAGE_NORMALIZERS, POLICY_LOSSES, aggregation_weights, group_advantages,
                          group_spread, k3_kl, overlong_penalty, pass_at_k, policy_loss, register_advantage,
                          register_aggregation, register_policy_loss, zero_std_fraction)

AGGREGATION_NAMES = ["sequence_mean", "token_mean", "constant"]


# ------------------------------------------------------------------------------------------------ advantages

def test_group_std_hand_case():
    # rewards [1, 0, 0, 1 | 2, 2, 2, 5], G = 4.
    # group 0: mean 0.5, Bessel var = 4 * 0.25 / 3 = 1/3, std = 0.577350; A = ±0.5 / 0.577450 = ±0.865875
    # group 1: mean 2.75, deviations (-.75, -.75, -.75, 2.25), var = (3 * .5625 + 5.0625) / 3 = 2.25, std = 1.5;
    #          A = -0.75 / 1.5001 = -0.499967, 2.25 / 1.5001 = 1.499900
    rewards = torch.tensor([1.0, 0, 0, 1, 2, 2, 2, 5])
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    expected = torch.tensor([a, -a, -a, a, -0.75 / 1.5001, -0.75 / 1.5001, -0.75 / 1.5001, 2.25 / 1.5001])
    torch.testing.assert_close(group_advantages(rewards, 4), expected)
    torch.testing.assert_close(group_advantages(rewards, 4, normalize="group_std")[:2],
                               torch.tensor([0.865875, -0.865875]), atol=1e-6, rtol=0)


def _naive_advantages(rewards, group_size, normalize):
    out = []
    batch_std = statistics.stdev(rewards)  # Bessel's correction, as TRL's torch.std
    for g in range(len(rewards) // group_size):
        group = rewards[g * group_size:(g + 1) * group_size]
        mean = sum(group) / group_size
        scale = {"group_std": statistics.stdev(group) + 1e-4, "batch_std": batch_std + 1e-4, "none": 1.0}[normalize]
        out += [(r - mean) / scale for r in group]
    return out


@pytest.mark.parametrize("normalize", ["group_std", "batch_std", "none"])
@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_advantages_match_naive_loop(normalize, group_size):
    g = torch.Generator().manual_seed(group_size)
    rewards = torch.randn(6 * group_size, generator=g, dtype=torch.float64)
    rewards[:group_size] = 0.7  # a flat group: zero advantages, not NaN
    got = group_advantages(rewards, group_size, normalize=normalize)
    assert got.dtype == torch.float64 and got.shape == rewards.shape
    torch.testing.assert_close(got, torch.tensor(_naive_advantages(rewards.tolist(), group_size, normalize),
                                                 dtype=torch.float64))
    assert torch.all(got[:group_size] == 0)


def test_dr_grpo_advantages_are_mean_centred_only():
    # Dr. GRPO drops the std: a group's advantages keep the reward scale and sum to zero.
    rewards = torch.tensor([0.0, 10.0, 0.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(group_advantages(rewards, 3, normalize="none"),
                               torch.tensor([-10 / 3, 20 / 3, -10 / 3, -2 / 3, 1 / 3, 1 / 3]))


def test_integer_rewards_become_float():
    assert group_advantages(torch.tensor([0, 1, 1, 1]), 2).dtype == torch.float32


@pytest.mark.parametrize("kwargs, word", [
    (dict(rewards_B=torch.ones(6), group_size=4), "group_size"),
    (dict(rewards_B=torch.ones(6), group_size=1), "group_size"),
    (dict(rewards_B=torch.ones(6), group_size=2.0), "group_size"),
    (dict(rewards_B=torch.ones(6), group_size=2, normalize="grpo"), "normalize"),
    (dict(rewards_B=torch.tensor([1.0, float("nan")]), group_size=2), "NaN"),
    (dict(rewards_B=torch.tensor([1.0, float("inf")]), group_size=2), "rewards_B"),
    (dict(rewards_B=torch.ones(2, 2), group_size=2), "rewards_B"),
    (dict(rewards_B=torch.ones(0), group_size=2), "rewards_B"),
])
def test_advantage_errors_name_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        group_advantages(**kwargs)


def test_a_registered_normalizer_is_chosen_by_name():
    @register_advantage("test_rank")
    def _rank(rewards_N_G):
        return rewards_N_G.argsort(dim=1).argsort(dim=1).to(rewards_N_G.dtype)
    try:
        torch.testing.assert_close(group_advantages(torch.tensor([3.0, 1, 2, 5, 4, 6]), 3, normalize="test_rank"),
                                   torch.tensor([2.0, 0, 1, 1, 0, 2]))
    finally:
        del ADVANTAGE_NORMALIZERS["test_rank"]


@pytest.mark.parametrize("register, registry, taken", [(register_advantage, ADVANTAGE_NORMALIZERS, "group_std"),
                                                       (register_aggregation, AGGREGATIONS, "token_mean"),
                                                       (register_policy_loss, POLICY_LOSSES, "ppo_clip")])
def test_every_registry_refuses_a_second_function_under_a_taken_name(register, registry, taken):
    before = dict(registry)
    with pytest.raises(ValueError, match=f"'{taken}' is taken"):
        register(taken)(lambda *args, **kwargs: None)
    assert registry == before  # the first function still answers to the name


def test_a_registered_policy_loss_is_chosen_by_name():
    """A variant is a new registered function: here REINFORCE's -ρ·A (no clip), whose gradient at ρ = 1 is -A per
    token, and which clips nothing."""
    @register_policy_loss("test_unclipped")
    def _unclipped(log_ratio_B_T, advantages_B_1, weights_B_T, options):
        nothing_B_T = torch.zeros_like(weights_B_T, dtype=torch.bool)
        return -torch.exp(log_ratio_B_T) * advantages_B_1, {"low": nothing_B_T, "high": nothing_B_T}
    try:
        logp = torch.tensor([[math.log(2.0), 0.0]], dtype=torch.float64, requires_grad=True)  # ρ = 2: PPO would clip
        args = (torch.zeros(1, 2, dtype=torch.float64), torch.tensor([1.0]), torch.ones(1, 2))
        loss, metrics = policy_loss(logp, *args, loss="test_unclipped", aggregation="token_mean")
        assert loss.item() == pytest.approx(-(2.0 + 1.0) / 2)
        assert torch.autograd.grad(loss, logp)[0][0].tolist() == pytest.approx([-1.0, -0.5])
        assert metrics["policy/clip_frac"].item() == 0
        clipped, ppo_metrics = policy_loss(logp, *args, loss="ppo_clip", aggregation="token_mean")
        assert ppo_metrics["policy/clip_frac_high"].item() == 0.5  # the default clips the ρ = 2 token
    finally:
        del POLICY_LOSSES["test_unclipped"]


def test_zero_std_fraction():
    rewards = torch.tensor([1.0, 1, 1, 0, 1, 0, 0, 0, 0, 2, 2, 2])  # groups of 3: flat, mixed, flat, flat
    assert zero_std_fraction(rewards, 3).item() == pytest.approx(0.75)
    assert zero_std_fraction(rewards, 6).item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="group_size"):
        zero_std_fraction(rewards, 5)


# ------------------------------------------------------------------------------------------------ policy loss

def _naive_policy_loss(logp, old, adv, mask, clip_low, clip_high, aggregation, max_tokens=None, ref=None,
                       beta=0.0):
    """GRPO's objective (Shao et al. 2024, eq. 3) per element, with DAPO's / Dr. GRPO's normalizers."""
    B, T = len(logp), len(logp[0])
    per_token = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            ratio = math.exp(logp[b][t] - old[b][t])
            clipped = min(max(ratio, 1 - clip_low), 1 + clip_high)
            per_token[b][t] = -min(ratio * adv[b], clipped * adv[b])
            if ref is not None:
                per_token[b][t] += beta * (math.exp(ref[b][t] - logp[b][t]) - (ref[b][t] - logp[b][t]) - 1)
    sums = [sum(per_token[b][t] * mask[b][t] for t in range(T)) for b in range(B)]
    lengths = [sum(mask[b]) for b in range(B)]
    if aggregation == "sequence_mean":  # GRPO: 1/G Σ_i 1/|o_i| Σ_t
        return sum(s / n if n else 0.0 for s, n in zip(sums, lengths)) / B
    if aggregation == "token_mean":  # DAPO: 1/Σ|o_i| Σ_i Σ_t
        return sum(sums) / sum(lengths)
    return sum(sums) / (B * max_tokens)  # Dr. GRPO: constant normalizer


def _random_batch(B=6, T=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    # ratios spread over [e^-0.5, e^0.5] so every clip region is visited
    logp = old + (torch.rand(B, T, generator=g, dtype=dtype) - 0.5)
    ref = old + (torch.rand(B, T, generator=g, dtype=dtype) - 0.5)
    adv = torch.randn(B, generator=g, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[1] = 0  # a sequence with no trained tokens
    start = torch.randint(0, 2, (B,), generator=g)  # completions start after a prompt of 0 or 1 tokens
    t = torch.arange(T)
    mask = ((t >= start[:, None]) & (t < (start + lengths).clamp(max=T)[:, None])).to(dtype)
    return logp, old, adv, mask, ref


@pytest.mark.parametrize("aggregation", AGGREGATION_NAMES)
@pytest.mark.parametrize("clip_low, clip_high, beta", [(0.2, 0.2, 0.0), (0.2, 0.28, 0.0), (0.1, 0.3, 0.04)])
def test_policy_loss_matches_naive_loop(aggregation, clip_low, clip_high, beta):
    logp, old, adv, mask, ref = _random_batch(seed=int(clip_high * 100))
    ref_arg = ref if beta else None
    loss, _ = policy_loss(logp, old, adv, mask, clip_low=clip_low, clip_high=clip_high, aggregation=aggregation,
                          max_tokens=9, ref_logprobs_B_T=ref_arg, beta=beta)
    expected = _naive_policy_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), clip_low, clip_high,
                                  aggregation, 9, ref.tolist() if beta else None, beta)
    assert loss.dtype == torch.float64 and loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_policy_loss_hand_case():
    # B = 2, T = 2, clip 0.2/0.2.  Row 0: A = +1, ratios (1.0, 1.5), mask (1, 1):
    #   ℓ = -min(1.0, 1.0) = -1.0;  -min(1.5, 1.2) = -1.2            -> sum -2.2, |o| = 2
    # Row 1: A = -2, ratios (0.5, 2.0), mask (1, 0):
    #   ℓ = -min(-1.0, 0.8 * -2 = -1.6) = 1.6;  (masked)             -> sum 1.6, |o| = 1
    # sequence_mean: (-2.2 / 2 + 1.6 / 1) / 2 = 0.25;  token_mean: (-2.2 + 1.6) / 3 = -0.2
    # constant (max_tokens 4): (-2.2 + 1.6) / (2 * 4) = -0.075
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.0, 1.5], [0.5, 2.0]]))
    adv, mask = torch.tensor([1.0, -2.0]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    expected = {"sequence_mean": 0.25, "token_mean": -0.2, "constant": -0.075}
    for aggregation, value in expected.items():
        loss, metrics = policy_loss(logp, old, adv, mask, aggregation=aggregation, max_tokens=4)
        assert loss.item() == pytest.approx(value, abs=1e-6), aggregation
    # clipped tokens: (row 0, t 1) high (ρ 1.5 > 1.2, A > 0); (row 1, t 0) low (ρ 0.5 < 0.8, A < 0): 2 of 3
    assert metrics["policy/clip_frac_high"].item() == pytest.approx(1 / 3)
    assert metrics["policy/clip_frac_low"].item() == pytest.approx(1 / 3)
    assert metrics["policy/clip_frac"].item() == pytest.approx(2 / 3)
    assert metrics["policy/ratio_mean"].item() == pytest.approx((1.0 + 1.5 + 0.5) / 3)


@pytest.mark.parametrize("ratio, advantage, clipped", [
    (1.5, +1.0, True),    # above 1 + clip_high with A > 0: the clip binds, no gradient
    (1.5, -1.0, False),   # above 1 + clip_high with A < 0: min picks the unclipped ρA (pessimistic), gradient
    (0.5, -1.0, True),    # below 1 - clip_low with A < 0: clipped
    (0.5, +1.0, False),   # below 1 - clip_low with A > 0: not clipped
    (1.1, +1.0, False),   # inside the trust region
    (1.1, -1.0, False),
])
def test_clipping_edge_cases(ratio, advantage, clipped):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, metrics = policy_loss(logp, torch.zeros(1, 1), torch.tensor([advantage]), torch.ones(1, 1))
    loss.backward()
    bound = min(max(ratio, 0.8), 1.2)
    assert loss.item() == pytest.approx(-min(ratio * advantage, bound * advantage))
    if clipped:
        assert logp.grad.item() == 0
    else:  # d(-ρA)/dlogp = -ρA
        assert logp.grad.item() == pytest.approx(-ratio * advantage)
    side = "policy/clip_frac_high" if ratio > 1 else "policy/clip_frac_low"
    assert metrics[side].item() == float(clipped)
    assert metrics["policy/clip_frac"].item() == float(clipped)


def test_dapo_clip_higher_leaves_room_for_low_probability_tokens():
    # DAPO (Yu et al. 2025, eq. 10): ε_high = 0.28 > ε_low = 0.2 lets a positively rewarded token grow to ρ = 1.28.
    logp = torch.tensor([[math.log(1.25)]], requires_grad=True)
    args = (torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1))
    symmetric, _ = policy_loss(logp, *args, clip_low=0.2, clip_high=0.2)
    assert torch.autograd.grad(symmetric, logp)[0].item() == 0
    higher, _ = policy_loss(logp, *args, clip_low=0.2, clip_high=0.28)
    assert torch.autograd.grad(higher, logp)[0].item() == pytest.approx(-1.25)


@pytest.mark.parametrize("aggregation", AGGREGATION_NAMES)
def test_on_policy_gradient_is_vanilla_policy_gradient(aggregation):
    # With old == logprobs (ρ = 1, nothing clipped) the gradient is REINFORCE's: ∇ of -A·logπ, aggregated alike.
    logp, _, adv, mask, _ = _random_batch(seed=3)
    logp.requires_grad_(True)
    loss, _ = policy_loss(logp, logp.detach().clone(), adv, mask, aggregation=aggregation, max_tokens=9)
    (grad,) = torch.autograd.grad(loss, logp)
    def reinforce(x_B_T):
        pg_B_T = -adv[:, None] * x_B_T * mask
        lengths = mask.sum(1).clamp(min=1)
        return {"sequence_mean": (pg_B_T.sum(1) / lengths).mean(), "token_mean": pg_B_T.sum() / mask.sum(),
                "constant": pg_B_T.sum() / (len(mask) * 9)}[aggregation]
    (expected,) = torch.autograd.grad(reinforce(logp), logp)
    torch.testing.assert_close(grad, expected)
    # and the loss value is the aggregated -A (ρ = 1 in every token)
    assert loss.item() == pytest.approx(reinforce(torch.ones_like(logp)).item())


def test_gradient_flows_only_through_logprobs():
    logp, old, adv, mask, ref = _random_batch(seed=4)
    tensors = [t.clone().requires_grad_(True) for t in (logp, old, adv, ref)]
    loss, metrics = policy_loss(tensors[0], tensors[1], tensors[2], mask, ref_logprobs_B_T=tensors[3], beta=0.1)
    loss.backward()
    assert tensors[0].grad is not None and tensors[0].grad.abs().sum() > 0
    assert all(t.grad is None for t in tensors[1:])
    assert not any(m.requires_grad for m in metrics.values())


@pytest.mark.parametrize("aggregation", AGGREGATION_NAMES)
def test_micro_batches_recombined_by_weights_equal_the_full_batch(aggregation):
    # The engine's weighted step: micro-batch k's loss counts W_k / W, W_k = Σ of its aggregation weights.
    logp, old, adv, mask, ref = _random_batch(B=9, T=6, seed=5)
    leaf = logp.clone().requires_grad_(True)
    kwargs = dict(clip_low=0.2, clip_high=0.28, aggregation=aggregation, max_tokens=8, beta=0.05)
    full, _ = policy_loss(leaf, old, adv, mask, ref_logprobs_B_T=ref, **kwargs)
    (full_grad,) = torch.autograd.grad(full, leaf)

    weight_B = aggregation_weights(mask, aggregation, max_tokens=8)
    total = weight_B.sum()
    combined = 0.0
    for rows in (slice(0, 2), slice(2, 3), slice(3, 7), slice(7, 9)):  # uneven micro-batches, one all-masked row
        part, _ = policy_loss(leaf[rows], old[rows], adv[rows], mask[rows], ref_logprobs_B_T=ref[rows], **kwargs)
        share = weight_B[rows].sum() / total
        (share * part).backward()
        combined += (share * part).item()
    assert combined == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(leaf.grad, full_grad, rtol=1e-12, atol=1e-15)


NAN, INF = float("nan"), math.inf


@pytest.mark.parametrize("aggregation", AGGREGATION_NAMES)
@pytest.mark.parametrize("junk", [(-INF, INF, NAN, NAN), (0.0, -INF, INF, INF), (NAN, -INF, -INF, NAN)])
def test_garbage_on_untrained_positions_changes_nothing(aggregation, junk):
    # Padding may carry -inf log-probs (masked logits) or stale values; the loss, gradient and metrics ignore them.
    logp, old, adv, mask, ref = _random_batch(seed=8)
    entropy = torch.rand_like(logp)
    dirty = [t.clone() for t in (logp, old, ref, entropy)]
    for t, value in zip(dirty, junk):  # logprobs, old, ref, entropy
        t[mask == 0] = value
    results = []
    for lp, o, r, e in ((logp, old, ref, entropy), dirty):
        leaf = lp.clone().requires_grad_(True)
        loss, metrics = policy_loss(leaf, o, adv, mask, aggregation=aggregation, max_tokens=9,
                                    ref_logprobs_B_T=r, beta=0.1, entropy_B_T=e)
        loss.backward()
        results.append((loss, leaf.grad * mask, metrics))
    (clean_loss, clean_grad, clean_metrics), (loss, grad, metrics) = results
    assert torch.isfinite(loss) and loss.item() == pytest.approx(clean_loss.item(), rel=1e-12)
    assert torch.equal(torch.isfinite(grad), torch.ones_like(grad, dtype=torch.bool))
    torch.testing.assert_close(grad, clean_grad)
    assert {k: v.item() for k, v in metrics.items()} == pytest.approx({k: v.item() for k, v in clean_metrics.items()})


def test_aggregation_weights_hand_case():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    assert aggregation_weights(mask, "sequence_mean").tolist() == [1, 1, 1]
    assert aggregation_weights(mask, "token_mean").tolist() == [2, 0, 3]
    assert aggregation_weights(mask, "constant", max_tokens=5).tolist() == [1, 1, 1]
    assert set(AGGREGATIONS) >= set(AGGREGATION_NAMES)


def test_sequence_without_trained_tokens_counts_as_zero_in_sequence_mean():
    logp, old = torch.zeros(2, 2), torch.zeros(2, 2)
    loss, _ = policy_loss(logp, old, torch.tensor([1.0, 5.0]), torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert loss.item() == pytest.approx(-0.5)  # (-1 + 0) / 2, as TRL's clamp(min=1)
    loss, metrics = policy_loss(logp, old, torch.ones(2), torch.zeros(2, 2), aggregation="token_mean")
    assert loss.item() == 0 and metrics["policy/ratio_mean"].item() == 0  # nothing trained: 0, not NaN


def test_k3_kl_hand_values_and_metric():
    # ref - logp = log 2: 2 - log 2 - 1 = 0.306853;  ref == logp: 0;  ref - logp = -1: e^-1 + 1 - 1 = 0.367879
    ref = torch.tensor([[math.log(2.0), 0.0, -1.0]])
    kl = k3_kl(ref, torch.zeros(1, 3))
    torch.testing.assert_close(kl, torch.tensor([[0.306853, 0.0, 0.367879]]), atol=1e-6, rtol=0)
    loss0, metrics = policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1), torch.ones(1, 3),
                                 ref_logprobs_B_T=ref, beta=0.0)
    assert loss0.item() == 0  # beta 0: reported, not penalized
    assert metrics["policy/kl"].item() == pytest.approx(kl.mean().item())
    loss, _ = policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1), torch.ones(1, 3),
                          ref_logprobs_B_T=ref, beta=0.5)
    assert loss.item() == pytest.approx(0.5 * kl.mean().item())
    _, no_ref = policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1), torch.ones(1, 3))
    assert "policy/kl" not in no_ref


def test_metrics_are_tensors_matching_a_naive_count():
    logp, old, adv, mask, _ = _random_batch(B=8, T=5, seed=6)
    entropy = torch.rand(8, 5, dtype=torch.float64)
    _, metrics = policy_loss(logp, old, adv, mask, clip_low=0.1, clip_high=0.3, entropy_B_T=entropy)
    low = high = n = 0
    ratios = ents = 0.0
    for b in range(8):
        for t in range(5):
            if mask[b, t]:
                r = math.exp(logp[b, t] - old[b, t])
                low += r < 0.9 and adv[b] < 0
                high += r > 1.3 and adv[b] > 0
                ratios, ents, n = ratios + r, ents + entropy[b, t].item(), n + 1
    assert 0 < low and 0 < high  # the case exercises both sides
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in metrics.values())
    assert metrics["policy/clip_frac_low"].item() == pytest.approx(low / n)
    assert metrics["policy/clip_frac_high"].item() == pytest.approx(high / n)
    assert metrics["policy/clip_frac"].item() == pytest.approx((low + high) / n)
    assert metrics["policy/ratio_mean"].item() == pytest.approx(ratios / n)
    assert metrics["policy/entropy"].item() == pytest.approx(ents / n)


def test_bool_mask_and_float32():
    logp, old, adv, mask, _ = _random_batch(seed=7, dtype=torch.float32)
    a, _ = policy_loss(logp, old, adv, mask.bool(), aggregation="token_mean")
    b, _ = policy_loss(logp, old, adv, mask, aggregation="token_mean")
    assert a.dtype == torch.float32 and a.item() == b.item()


@pytest.mark.parametrize("change, word", [
    (dict(old_logprobs_B_T=torch.zeros(2, 4)), "old_logprobs_B_T"),
    (dict(weights_B_T=torch.ones(2, 3, 1)), "weights_B_T"),
    (dict(advantages_B=torch.zeros(3)), "advantages_B"),
    (dict(logprobs_B_T=torch.zeros(2, 3, dtype=torch.long)), "logprobs_B_T"),
    (dict(aggregation="dapo"), "aggregation"),
    (dict(loss="gspoo"), "unknown loss 'gspoo'; choose one of"),
    (dict(aggregation="constant"), "max_tokens"),
    (dict(aggregation="constant", max_tokens=0), "max_tokens"),
    (dict(beta=0.1), "ref_logprobs_B_T"),
    (dict(beta=-0.1, ref_logprobs_B_T=torch.zeros(2, 3)), "beta"),
    (dict(ref_logprobs_B_T=torch.zeros(3, 3)), "ref_logprobs_B_T"),
    (dict(clip_low=1.0), "clip_low"),
    (dict(clip_high=-0.1), "clip_high"),
])
def test_policy_loss_errors_name_the_argument(change, word):
    args = dict(logprobs_B_T=torch.zeros(2, 3), old_logprobs_B_T=torch.zeros(2, 3), advantages_B=torch.zeros(2),
                weights_B_T=torch.ones(2, 3))
    with pytest.raises(ValueError, match=word):
        policy_loss(**{**args, **change})


# ------------------------------------------------------------------------------------------------ pass@k

def test_pass_at_k_equals_exact_combinatorics():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-14), (n, c, k)


def test_pass_at_k_large_n_is_stable():
    # C(256, 128) ~ 5.8e75: the binomials are huge, the product form is not.
    for c, k in [(0, 1), (1, 1), (3, 200), (10, 128), (200, 56), (250, 7)]:
        exact = 1 - Fraction(math.comb(256 - c, k), math.comb(256, k))
        assert pass_at_k(256, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-300)
    assert pass_at_k(256, 1, 1) == pytest.approx(1 / 256)  # pass@1 is the fraction correct


def test_pass_at_k_is_vectorized_over_problems_and_k():
    n, c = np.array([16, 16, 8, 4]), torch.tensor([0, 5, 8, 1])
    ks = np.array([1, 2, 4])[:, None]  # (K, 1) against (P,) problems -> (K, P)
    got = pass_at_k(n, c, ks)
    assert got.shape == (3, 4) and got.dtype == np.float64
    for i, k in enumerate([1, 2, 4]):
        for p in range(4):
            assert got[i, p] == pytest.approx(pass_at_k(int(n[p]), int(c[p]), k))
    assert isinstance(pass_at_k(4, 1, 2), float)
    np.testing.assert_allclose(pass_at_k(n, c, 1), c.numpy() / n)


@pytest.mark.parametrize("n, c, k, word", [(4, 5, 1, "c"), (4, -1, 1, "c"), (4, 1, 0, "k"), (4, 1, 5, "k"),
                                           (4.5, 1, 1, "n"), (4, 1, 1.5, "k")])
def test_pass_at_k_errors(n, c, k, word):
    with pytest.raises(ValueError, match=rf"\b{word}\b"):
        pass_at_k(n, c, k)


# ------------------------------------------------------------------------------------------------ the variants

LOSS_NAMES = ["ppo_clip", "gspo", "cispo", "sapo"]


def _naive_token_losses(name, logp, old, adv, mask, clip_low, clip_high, delta=None, tau_pos=1.0, tau_neg=1.05):
    """Each loss's per-token value by its paper's formula, element by element (lists of floats)."""
    B, T = len(logp), len(logp[0])
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        a, trained = adv[b], [t for t in range(T) if mask[b][t]]
        s = math.exp(sum((logp[b][t] - old[b][t]) * mask[b][t] for t in trained) / sum(mask[b][t] for t in trained)) \
            if trained else 1.0  # GSPO's sequence ratio: geometric mean of the token ratios, by weight
        for t in trained:
            ratio = math.exp(logp[b][t] - old[b][t])
            if name == "ppo_clip":
                unclipped = ratio if delta is None else min(ratio, delta)
                out[b][t] = -min(unclipped * a, min(max(ratio, 1 - clip_low), 1 + clip_high) * a)
            elif name == "gspo":
                out[b][t] = -min(s * a, min(max(s, 1 - clip_low), 1 + clip_high) * a)
            elif name == "cispo":
                out[b][t] = -min(ratio, 1 + clip_high) * a * (logp[b][t] - old[b][t])
            else:  # sapo
                tau = tau_pos if a > 0 else tau_neg
                out[b][t] = -(4 / tau) / (1 + math.exp(-tau * (ratio - 1))) * a
    return out


def _aggregate(per_token, mask, aggregation, max_tokens):
    sums = [sum(v * m for v, m in zip(row, mrow)) for row, mrow in zip(per_token, mask)]
    lengths = [sum(mrow) for mrow in mask]
    if aggregation == "sequence_mean":
        return sum(s / n if n else 0.0 for s, n in zip(sums, lengths)) / len(sums)
    if aggregation == "token_mean":
        return sum(sums) / sum(lengths)
    return sum(sums) / (len(sums) * max_tokens)


@pytest.mark.parametrize("aggregation", AGGREGATION_NAMES)
@pytest.mark.parametrize("name, options", [("ppo_clip", dict(delta=1.3)), ("gspo", dict(clip_low=0.03, clip_high=0.04)),
                                           ("cispo", dict(clip_high=0.1)),
                                           ("sapo", dict(sapo_tau_pos=1.0, sapo_tau_neg=1.05)),
                                           ("sapo", dict(sapo_tau_pos=3.0, sapo_tau_neg=5.0))])
def test_each_loss_matches_a_naive_per_token_loop(name, options, aggregation):
    logp, old, adv, mask, _ = _random_batch(seed=11)
    logp = old + (logp - old) * 1.5  # ratios out to e^±0.75: past delta = 1.3 and every clip
    kwargs = {"clip_low": 0.2, "clip_high": 0.2, **options}
    loss, _ = policy_loss(logp, old, adv, mask, loss=name, aggregation=aggregation, max_tokens=9, **kwargs)
    per_token = _naive_token_losses(name, logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(),
                                    kwargs["clip_low"], kwargs["clip_high"], kwargs.get("delta"),
                                    kwargs.get("sapo_tau_pos", 1.0), kwargs.get("sapo_tau_neg", 1.05))
    assert loss.item() == pytest.approx(_aggregate(per_token, mask.tolist(), aggregation, 9), rel=1e-12, abs=1e-14)


def test_delta_caps_a_runaway_negative_token_and_is_reported():
    # A = -1. ρ = 2 without delta: -min(-2, -1.2) = 2, gradient -ρA = 2. With delta = 1.5: -min(-1.5, -1.2) = 1.5,
    # constant: no gradient, clipped "delta". ρ = 1.4 < delta: as PPO (1.4, gradient 1.4).
    for ratio, delta, value, grad, frac in ((2.0, None, 2.0, 2.0, 0.0), (2.0, 1.5, 1.5, 0.0, 1.0),
                                            (1.4, 1.5, 1.4, 1.4, 0.0)):
        logp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
        loss, metrics = policy_loss(logp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([-1.0]),
                                    torch.ones(1, 1), delta=delta)
        assert loss.item() == pytest.approx(value)
        assert torch.autograd.grad(loss, logp)[0].item() == pytest.approx(grad)
        assert metrics.get("policy/clip_frac_delta", torch.tensor(0.0)).item() == frac
        assert metrics["policy/clip_frac"].item() == frac
    with pytest.raises(ValueError, match="delta must be a finite number > 1 \\+ clip_high"):
        policy_loss(logp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([-1.0]), torch.ones(1, 1), delta=1.1)


def test_gspo_hand_case_one_ratio_per_sequence():
    # Row 0: token ratios 1.1 and 1.21 (log-ratios 0.0953, 0.1906): s = exp(mean) = 1.1^1.5 = 1.15369, A = +1,
    # clip 0.2/0.2: inside, ℓ = -1.15369 on both tokens; d/dlogp_t of -s·A = -s/2 per token.
    # Row 1: ratios 1.5, 1.5 (s = 1.5 > 1.2), A = +1: clipped high, ℓ = -1.2, no gradient, both tokens counted.
    logp = torch.log(torch.tensor([[1.1, 1.21], [1.5, 1.5]], dtype=torch.float64)).requires_grad_(True)
    loss, metrics = policy_loss(logp, torch.zeros(2, 2, dtype=torch.float64), torch.tensor([1.0, 1.0]),
                                torch.ones(2, 2), loss="gspo")
    s = 1.1 ** 1.5
    assert loss.item() == pytest.approx((-s - 1.2) / 2)
    grad = torch.autograd.grad(loss, logp)[0]
    assert grad.flatten().tolist() == pytest.approx([-s / 4, -s / 4, 0.0, 0.0])  # (1/2 sequences) x (-s/2)
    assert metrics["policy/clip_frac_high"].item() == 0.5


def test_cispo_keeps_the_gradient_of_a_clipped_token_with_a_capped_weight():
    # ρ = 2, A = +1, clip_high 0.2: PPO drops the token; CISPO keeps -sg(min(2, 1.2))·A·∇logπ = -1.2.
    logp = torch.tensor([[math.log(2.0)]], dtype=torch.float64, requires_grad=True)
    args = (torch.zeros(1, 1, dtype=torch.float64), torch.tensor([1.0]), torch.ones(1, 1))
    loss, metrics = policy_loss(logp, *args, loss="cispo")
    assert torch.autograd.grad(loss, logp)[0].item() == pytest.approx(-1.2)
    assert loss.item() == pytest.approx(-1.2 * math.log(2.0))
    assert metrics["policy/clip_frac_high"].item() == 1.0
    ppo, _ = policy_loss(logp, *args)
    assert torch.autograd.grad(ppo, logp)[0].item() == 0


def test_sapo_gate_is_the_policy_gradient_on_policy_and_fades_off_policy():
    # At ρ = 1: f = (4/τ)·σ(0) = 2/τ, gradient -A·ρ·4σ(1-σ) = -A, whatever τ. At ρ = 3, τ = 1.05 (A < 0):
    # σ(2.1) = 0.890903, gradient -A·3·4·σ(1-σ) = 3 · 4 · 0.890903 · 0.109097 = 1.166329; faded (4σ(1-σ) = 0.3888).
    for ratio, a, grad, faded in ((1.0, 1.0, -1.0, 0.0), (1.0, -1.0, 1.0, 0.0), (3.0, -1.0, 1.166329, 1.0)):
        logp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
        loss, metrics = policy_loss(logp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([a]),
                                    torch.ones(1, 1), loss="sapo")
        tau = 1.0 if a > 0 else 1.05
        assert loss.item() == pytest.approx(-(4 / tau) / (1 + math.exp(-tau * (ratio - 1))) * a)
        assert torch.autograd.grad(loss, logp)[0].item() == pytest.approx(grad, rel=1e-5)
        assert metrics["policy/clip_frac_high"].item() == faded


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("aggregation", AGGREGATION_NAMES)
def test_every_loss_recombines_from_micro_batches_with_entropy_bonus_and_mask(name, aggregation):
    """The engine's weighted step for every loss, with the entropy bonus (each micro-batch's normalizer: the whole
    batch's trained tokens x its share) and a policy mask: loss and gradient equal the whole batch's."""
    logp, old, adv, mask, ref = _random_batch(B=9, T=6, seed=5)
    entropy_leaf = torch.rand_like(logp).requires_grad_(True)
    policy_mask = torch.rand(logp.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) < 0.6
    leaf = logp.clone().requires_grad_(True)
    kwargs = dict(loss=name, clip_low=0.2, clip_high=0.28, aggregation=aggregation, max_tokens=8, beta=0.05,
                  entropy_coef=0.3)
    full, _ = policy_loss(leaf, old, adv, mask, ref_logprobs_B_T=ref, entropy_B_T=entropy_leaf,
                          policy_mask_B_T=policy_mask, **kwargs)
    full_grads = torch.autograd.grad(full, (leaf, entropy_leaf))

    weight_B = aggregation_weights(mask, aggregation, max_tokens=8)
    combined = 0.0
    for rows in (slice(0, 2), slice(2, 3), slice(3, 7), slice(7, 9)):
        share = weight_B[rows].sum() / weight_B.sum()
        part, _ = policy_loss(leaf[rows], old[rows], adv[rows], mask[rows], ref_logprobs_B_T=ref[rows],
                              entropy_B_T=entropy_leaf[rows], policy_mask_B_T=policy_mask[rows],
                              entropy_normalizer=share * mask.sum(), **kwargs)
        (share * part).backward()
        combined += (share * part).item()
    assert combined == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(leaf.grad, full_grads[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(entropy_leaf.grad, full_grads[1], rtol=1e-12, atol=1e-15)


def test_entropy_bonus_is_the_mean_entropy_per_trained_token_whatever_the_aggregation():
    # Two rows, entropies (1, 3 | 2, masked): the bonus is -coef · (1 + 3 + 2) / 3 under every aggregation.
    logp = torch.zeros(2, 2, dtype=torch.float64)
    entropy_B_T = torch.tensor([[1.0, 3.0], [2.0, 99.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    for aggregation in AGGREGATION_NAMES:
        plain, _ = policy_loss(logp, logp, torch.zeros(2), mask, aggregation=aggregation, max_tokens=4)
        loss, metrics = policy_loss(logp, logp, torch.zeros(2), mask, aggregation=aggregation, max_tokens=4,
                                    entropy_B_T=entropy_B_T, entropy_coef=0.5)
        assert loss.item() - plain.item() == pytest.approx(-0.5 * 6 / 3)
        assert torch.autograd.grad(loss, entropy_B_T)[0].flatten().tolist() == pytest.approx([-0.5 / 3] * 3 + [0.0])
        assert metrics["policy/entropy"].item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="entropy_coef=0.5 needs entropy_B_T with a gradient"):
        policy_loss(logp, logp, torch.zeros(2), mask, entropy_B_T=entropy_B_T.detach(), entropy_coef=0.5)


def test_policy_mask_keeps_the_normalizer_and_drops_the_masked_tokens_gradient():
    # "Beyond the 80/20 rule" eq. 5: the indicator multiplies the term; the normalizer is still every token.
    logp = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([[True, False, True, False]])
    loss, metrics = policy_loss(logp, logp.detach(), torch.tensor([2.0]), torch.ones(1, 4), aggregation="token_mean",
                                policy_mask_B_T=keep)
    assert loss.item() == pytest.approx(-2.0 * 2 / 4)
    assert torch.autograd.grad(loss, logp)[0].flatten().tolist() == pytest.approx([-0.5, 0.0, -0.5, 0.0])
    assert metrics["policy/pg_token_frac"].item() == 0.5


def test_overlong_penalty_follows_dapo_eq_13():
    # max_new_tokens 10, buffer 4: 0 through 6 tokens, then -p·(|y| - 6)/4: 7 -> -0.25p, 10 -> -p.
    lengths = torch.tensor([1, 6, 7, 8, 10])
    assert overlong_penalty(lengths, 10, 4, 2.0).tolist() == pytest.approx([0, 0, -0.5, -1.0, -2.0])
    assert overlong_penalty(lengths, 10, 10, 1.0).tolist() == pytest.approx([-0.1, -0.6, -0.7, -0.8, -1.0])
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, 10, 0, 1.0)


def test_group_spread_marks_the_groups_that_teach():
    rewards = torch.tensor([1.0, 1, 0, 1, 0.5, 0.5, 0, 0])
    assert group_spread(rewards, 2).tolist() == [False, True, False, False]
    assert group_spread(rewards, 4).tolist() == [True, True]


def test_the_entropy_threshold_is_torch_quantile_and_takes_more_than_its_2_24_elements():
    from paperloop.rl.losses import linear_quantile
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 1000):
        values = torch.rand(n, generator=g, dtype=torch.float64)
        for q in (0.0, 0.2, 0.5, 0.8, 1.0):
            torch.testing.assert_close(linear_quantile(values, q), torch.quantile(values, q), rtol=0, atol=1e-15)
    many = torch.arange(2 ** 24 + 1, dtype=torch.float32)  # torch.quantile refuses this many
    assert float(linear_quantile(many, 0.75)) == 0.75 * 2 ** 24
