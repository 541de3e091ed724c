"""paperloop.lm.sampling: the KV-cached sampling loop that draws only from the caller's torch.Generator, and the
turn sampler that multi-turn episodes continue from one turn to the next.

Checked against transformers' own greedy `generate`, a full no-grad forward (log-probs), exact softmax
probabilities (empirical token frequencies), and by hand (EOS stopping, padding, grouping).
"""

import copy
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

from paperloop.lm.sampling import GrowingLayer, TurnSampler, cache_argument, draw, sample, top_p_filter

VOCAB, PAD, BOS = 50, 0, 1
NEVER = VOCAB  # an EOS id outside the vocabulary: no row ever stops
PROMPTS = [[BOS, 5, 6, 7, 8, 9], [BOS, 10], [BOS, 11, 12, 13]]  # different lengths: left padding matters


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # initializer_range 0.2 gives peaked next-token distributions (mean max prob ~0.26), so greedy has no near-ties
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.2, bos_token_id=BOS, eos_token_id=2, pad_token_id=PAD)
    return LlamaForCausalLM(config).eval()


def _sample(model, prompts=PROMPTS, num_samples=4, max_new_tokens=12, seed=0, **kwargs):
    kwargs = {"eos_token_id": NEVER, "pad_token_id": PAD, **kwargs}
    generator = kwargs.pop("generator", None) or torch.Generator().manual_seed(seed)
    return sample(model, prompts, num_samples, max_new_tokens, generator=generator, **kwargs)


def _generate_greedy(model, prompts, max_new_tokens, eos):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=eos, pad_token_id=PAD)[:, width:].tolist()
    return [row[:row.index(eos) + 1] if eos in row else row for row in out]


# ------------------------------------------------------------------------------------------------ correctness

def test_greedy_equals_generate_with_and_without_eos(model):
    unstopped = _generate_greedy(model, PROMPTS, 12, NEVER)
    assert _sample(model, num_samples=1, temperature=0).completions() == unstopped
    eos = unstopped[0][3]  # a token that greedy reaches: row 0 stops at its first occurrence
    expected = _generate_greedy(model, PROMPTS, 12, eos)
    samples = _sample(model, num_samples=1, temperature=0, eos_token_id=eos)
    assert samples.completions() == expected
    assert samples.completions()[0][-1] == eos and len(expected[0]) <= 4
    assert samples.stopped_N.tolist() == [eos in row for row in expected]


def test_rows_are_grouped_by_prompt(model):
    # greedy with G = 3: rows i*G .. i*G+G-1 are prompt i's, each equal to that prompt's greedy completion
    alone = [_sample(model, [p], num_samples=1, temperature=0).completions()[0] for p in PROMPTS]
    grouped = _sample(model, num_samples=3, temperature=0).completions()
    assert grouped == [c for c in alone for _ in range(3)]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.6)])
def test_sampling_logprobs_match_a_full_forward(model, temperature, top_p, dtype, tolerance):
    # log softmax(logits / T) of the chosen tokens, before top-p truncation, from one unpadded forward per row.
    # In float64 the loop is exact (measured 0); in float32 the left-padded, batched, cached computation differs
    # from one unpadded forward in the last bits (measured 2e-6 to 3e-6 here, up to 3e-5 on larger models).
    model = copy.deepcopy(model).to(dtype)
    samples = _sample(model, num_samples=3, temperature=temperature, top_p=top_p, eos_token_id=[3, 4])
    assert samples.logprobs_N_L.dtype == dtype
    worst = 0.0
    for row, completion in enumerate(samples.completions()):
        prompt = PROMPTS[row // 3]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1]
        expected = torch.log_softmax(logits / temperature, dim=-1).gather(1, torch.tensor(completion)[:, None])
        worst = max(worst, (expected[:, 0] - samples.logprobs_N_L[row, :len(completion)]).abs().max().item())
    assert worst <= tolerance


def test_eos_stops_rows_and_pads_after(model):
    eos_ids = [3, 4, 5, 6, 7, 8, 9, 10]  # ~1 in 6 tokens: many rows stop early, a few run out of budget
    samples = _sample(model, num_samples=8, max_new_tokens=15, eos_token_id=eos_ids, seed=3)
    lengths, stopped = samples.lengths_N.tolist(), samples.stopped_N.tolist()
    assert 0 < sum(stopped) < len(stopped)  # the case exercises both endings
    assert samples.tokens_N_L.shape[1] == max(lengths)
    for row, (tokens, logprobs) in enumerate(zip(samples.tokens_N_L.tolist(), samples.logprobs_N_L.tolist())):
        n = lengths[row]
        hits = [i for i, tok in enumerate(tokens[:n]) if tok in eos_ids]
        if stopped[row]:
            assert hits == [n - 1]  # exactly one EOS, the last completion token
        else:
            assert hits == [] and n == 15
        assert tokens[n:] == [PAD] * (len(tokens) - n)  # not extended after EOS
        assert logprobs[n:] == [0.0] * (len(tokens) - n) and all(lp < 0 for lp in logprobs[:n])


def test_loop_ends_once_every_row_has_stopped(model):
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        samples = _sample(model, max_new_tokens=40, eos_token_id=list(range(VOCAB)))  # every token ends a row
    finally:
        handle.remove()
    assert samples.lengths_N.tolist() == [1] * 12 and samples.tokens_N_L.shape == (12, 1)
    assert bool(samples.stopped_N.all())
    assert len(calls) <= 1 + 4  # prefill + at most FINISHED_CHECK_EVERY decode steps, not 40


def test_the_cache_goes_by_the_name_the_model_takes(model, recwarn):
    # transformers 5.24 renamed past_key_values to cache (the old name goes in 5.40): passing the old one to a
    # model that takes the new would break the sampler on the first release without it
    _sample(model, max_new_tokens=3)
    assert not [w for w in recwarn.list if "past_key_values" in str(w.message)]

    class OldStyle(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            raise AssertionError("not called")

    class Wrapped(torch.nn.Module):  # a compiled model keeps the original as _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    class PassThrough(torch.nn.Module):  # a wrapper whose forward names neither: the installed release's name
        def forward(self, **kwargs):
            raise AssertionError("not called")

    assert cache_argument(OldStyle()) == "past_key_values"
    assert cache_argument(Wrapped(OldStyle())) == "past_key_values"
    assert cache_argument(model) == cache_argument(Wrapped(model)) == cache_argument(PassThrough())


def test_a_lora_model_samples_as_its_merged_weights_do(model):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                     init_lora_weights=False))
    assert cache_argument(lora) == cache_argument(model)
    merged = copy.deepcopy(lora).merge_and_unload()
    ours, theirs = _sample(lora, temperature=0, num_samples=1), _sample(merged, temperature=0, num_samples=1)
    assert ours.completions() == theirs.completions()
    torch.testing.assert_close(ours.logprobs_N_L, theirs.logprobs_N_L, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ randomness

def test_same_generator_state_gives_identical_samples(model):
    first, second = _sample(model, seed=7, top_p=0.9), _sample(model, seed=7, top_p=0.9)
    assert torch.equal(first.tokens_N_L, second.tokens_N_L)
    assert torch.equal(first.logprobs_N_L, second.logprobs_N_L)
    assert not torch.equal(_sample(model, seed=8).tokens_N_L, first.tokens_N_L)
    # resuming from a saved generator state continues the same stream: two calls == restore + two calls
    g = torch.Generator().manual_seed(11)
    state = g.get_state()
    a1, a2 = _sample(model, generator=g), _sample(model, generator=g)
    g.set_state(state)
    assert torch.equal(_sample(model, generator=g).tokens_N_L, a1.tokens_N_L)
    assert torch.equal(_sample(model, generator=g).tokens_N_L, a2.tokens_N_L)


def test_global_rng_is_neither_read_nor_advanced(model):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = _sample(model, seed=5)
    assert torch.equal(torch.get_rng_state(), before)  # not advanced
    torch.manual_seed(999)
    assert torch.equal(_sample(model, seed=5).tokens_N_L, a.tokens_N_L)  # not read


def test_tiny_top_p_is_greedy(model):
    greedy = _sample(model, num_samples=1, temperature=0).tokens_N_L
    assert torch.equal(_sample(model, num_samples=1, top_p=1e-6, temperature=1.5).tokens_N_L, greedy)


@pytest.mark.parametrize("temperature, top_p", [(0.5, 1.0), (2.0, 1.0), (1.0, 0.7), (0.5, 0.7), (2.0, 0.5)])
def test_first_token_frequencies_match_the_tempered_truncated_softmax(model, temperature, top_p):
    n = 4000
    samples = _sample(model, [PROMPTS[0]], num_samples=n, max_new_tokens=1, temperature=temperature, top_p=top_p)
    freq = torch.bincount(samples.tokens_N_L[:, 0], minlength=VOCAB).double() / n
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([PROMPTS[0]])).logits[0, -1].double() / temperature, dim=-1)
    target = top_p_filter(probs, top_p)
    target = target / target.sum()
    sigma = (target * (1 - target) / n).sqrt()
    assert torch.all((freq - target).abs() <= 5 * sigma + 1e-12), (freq - target).abs().max()
    assert torch.all(freq[target == 0] == 0)  # nothing outside the nucleus is ever drawn


def test_higher_temperature_spreads_the_samples(model):
    def entropy(temperature):
        tokens = _sample(model, [PROMPTS[1]], num_samples=2000, max_new_tokens=1, temperature=temperature)
        p = torch.bincount(tokens.tokens_N_L[:, 0], minlength=VOCAB).double() / 2000
        return -(p[p > 0] * p[p > 0].log()).sum().item()
    low, mid, high = entropy(0.3), entropy(1.0), entropy(3.0)
    assert low < mid < high


def test_top_p_filter_hand_case():
    # sorted probs (0.5, 0.25, 0.125, 0.125) (exact in binary): mass before each = (0, 0.5, 0.75, 0.875).
    # top_p 0.75: {0.5, 0.25} already reaches 0.75, so the rest go; 0.76 needs a third token; tiny keeps the top one.
    probs = torch.tensor([[0.125, 0.5, 0.125, 0.25]])
    assert top_p_filter(probs, 0.75).tolist() == [[0.0, 0.5, 0.0, 0.25]]
    assert top_p_filter(probs, 0.76).tolist() in ([[0.125, 0.5, 0.0, 0.25]], [[0.0, 0.5, 0.125, 0.25]])
    assert top_p_filter(probs, 1e-9).tolist() == [[0.0, 0.5, 0.0, 0.0]]
    assert top_p_filter(probs, 1.0).tolist() == probs.tolist()


def test_greedy_draw_returns_untempered_logprobs():
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    token, logprob = draw(logits, torch.Generator(), temperature=0)
    assert token.tolist() == [1]
    assert logprob.item() == pytest.approx(torch.log_softmax(logits, -1)[0, 1].item())


# ------------------------------------------------------------------------------------------------ plumbing

def test_model_mode_restored_and_results_usable_in_autograd(model):
    seen = []
    handle = model.register_forward_hook(lambda module, *_: seen.append(module.training))
    model.train()
    model.model.layers[0].eval()  # a frozen part stays frozen
    try:
        samples = _sample(model)
        assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    finally:
        model.eval()
        handle.remove()
    assert seen and not any(seen)  # sampled in eval mode (dropout off)
    _sample(model)
    assert not model.training
    scale = torch.ones(1, requires_grad=True)
    (samples.logprobs_N_L * scale).sum().backward()  # not inference tensors
    assert scale.grad is not None and not samples.tokens_N_L.is_inference()


def test_model_without_use_cache_in_config_still_caches(model):
    model.config.use_cache = False  # how the trainer keeps packed training leak-free
    try:
        assert _sample(model, num_samples=1, temperature=0).completions() == _generate_greedy(model, PROMPTS, 12,
                                                                                               NEVER)
    finally:
        model.config.use_cache = True


def test_growing_layer_matches_dynamic_layer_across_repeat_interleave():
    g = torch.Generator().manual_seed(0)
    plain, growing = DynamicLayer(), GrowingLayer()
    steps = [torch.randn(2, 3, 5, 4, generator=g)] + [torch.randn(6, 3, 1, 4, generator=g) for _ in range(12)]
    for i, kv in enumerate(steps):
        if i == 1:  # prefill for 2 prompts, then 3 samples each
            plain.batch_repeat_interleave(3)
            growing.batch_repeat_interleave(3)
        k_plain, v_plain = plain.update(kv, -kv)
        k_grow, v_grow = growing.update(kv, -kv)
        assert torch.equal(k_plain, k_grow) and torch.equal(v_plain, v_grow)
        assert growing.get_seq_length() == plain.get_seq_length()
    # methods that replace the tensors mid-generation (beam reordering, dropping rows): later updates follow them
    for layer in (plain, growing):
        layer.crop(-4)
        layer.batch_select_indices(torch.tensor([0, 2, 5]))
    for kv in steps[1:4]:
        assert torch.equal(growing.update(kv[:3], kv[:3])[0], plain.update(kv[:3], kv[:3])[0])


@pytest.mark.parametrize("change, word", [
    (dict(prompts=[]), "prompts"),
    (dict(prompts=[[BOS, 5], []]), r"prompts\[1\]"),
    (dict(prompts=[[BOS, -3]]), r"prompts\[0\]"),
    (dict(prompts="hello"), "prompts"),
    (dict(num_samples=0), "num_samples"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(eos_token_id=None), "eos_token_id"),
    (dict(eos_token_id=[]), "eos_token_id"),
    (dict(pad_token_id=-1), "pad_token_id"),
])
def test_bad_inputs_name_the_argument(model, change, word):
    args = dict(prompts=PROMPTS, num_samples=2, max_new_tokens=4, eos_token_id=2, pad_token_id=PAD)
    args.update(change)
    with pytest.raises(ValueError, match=word):
        sample(model, args.pop("prompts"), args.pop("num_samples"), args.pop("max_new_tokens"),
               generator=torch.Generator(), **args)


def test_a_template_that_ignores_the_generation_prompt_still_stops_at_its_end_of_turn(caplog):
    """Such a template renders a prompt for generation without the assistant's header; the end-of-turn marker it
    writes after an assistant's content must still stop generation (greedy output ran past the turn), and the
    user is told."""
    import logging

    from paperloop.lm import default_stop_token_ids
    from paperloop.models import word_level_tokenizer

    tok = word_level_tokenizer(["a", "b"])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
                         "{% endfor %}")  # no add_generation_prompt branch
    with caplog.at_level(logging.WARNING):
        ids = default_stop_token_ids(tok, None)
    assert tok.convert_tokens_to_ids("<|end|>") in ids and tok.eos_token_id in ids
    assert "ignores add_generation_prompt" in caplog.text


# ---- the turn sampler ----------------------------------------------------------------------------------------


def test_a_first_turn_is_the_single_turn_sample(model):
    """Same generator, same draws: distinct prompts, and a group's repeated prompt (prefilled once)."""
    for prompts, group in ((PROMPTS, 1), ([p for p in PROMPTS for _ in range(3)], 3)):
        single = sample(model, PROMPTS, group, 10, generator=torch.Generator().manual_seed(1), eos_token_id=[3, 4, 5],
                        pad_token_id=PAD)
        turn = TurnSampler(model, prompts, generator=torch.Generator().manual_seed(1), eos_token_id=[3, 4, 5],
                           pad_token_id=PAD).sample(10)
        assert turn.completions() == single.completions()
        assert torch.equal(turn.logprobs_N_L, single.logprobs_N_L)


def test_later_turns_continue_the_cache_exactly_as_a_full_forward_of_the_transcript(model):
    """Rows end at different turns, observations of 0 to 3 tokens: in float64 every action token's log-prob equals
    the one a forward of the whole transcript gives (to rounding), so cache, mask and positions are right."""
    model = copy.deepcopy(model).double()
    prompts = [p for p in PROMPTS for _ in range(2)]
    sampler = TurnSampler(model, prompts, generator=torch.Generator().manual_seed(2), temperature=0.8,
                          eos_token_id=[3, 4, 5, 6], pad_token_id=PAD)
    transcripts, logprobs = [list(p) for p in prompts], [[None] * len(p) for p in prompts]
    rng, ended, lengths = random.Random(0), [], set()
    for turn in range(4):
        actions = sampler.sample(6)
        going, observations = [], []
        for r, n in enumerate(sampler.rows):
            action = actions.completions()[r]
            transcripts[n] += action
            logprobs[n] += actions.logprobs_N_L[r, :len(action)].tolist()
            if turn < 3 and (n, turn) not in ((1, 1), (4, 0)):
                observation = [rng.randrange(7, VOCAB) for _ in range(rng.randrange(4))]
                lengths.add(len(observation))
                transcripts[n] += observation
                logprobs[n] += [None] * len(observation)
                going.append(n)
                observations.append(observation)
            else:
                ended.append(n)
        sampler.keep(going)
        if not going:
            break
        sampler.extend(observations)
    assert lengths == {0, 1, 2, 3} and len(set(len(t) for t in transcripts)) > 1
    worst = 0.0
    for tokens, expected in zip(transcripts, logprobs):
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([tokens])).logits[0, :-1] / 0.8, dim=-1)
        for i, value in enumerate(expected[1:], start=1):
            if value is not None:
                worst = max(worst, abs(full[i - 1, tokens[i]].item() - value))
    assert worst < 1e-12


def test_keep_refuses_rows_that_are_not_live(model):
    sampler = TurnSampler(model, PROMPTS, generator=torch.Generator(), eos_token_id=3, pad_token_id=PAD)
    sampler.sample(2)
    with pytest.raises(ValueError, match="subsequence"):
        sampler.keep([2, 0])
    with pytest.raises(ValueError, match="observations"):
        sampler.extend([[5]])
