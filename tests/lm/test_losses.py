"""Per-token log-probs, their entropy and the SFT loss (paperloop.lm.losses) against naive references, and the
packing proof: each example's loss is the same packed and padded with a model's default config (`use_cache=True`)."""

import pytest
import torch

import paperloop.lm.losses as losses
from paperloop.lm.data import pack_batch, pad_batch, tokenize_examples
from paperloop.lm.losses import chunked_scores, cross_entropy, forward_logprobs
from paperloop.models import tiny_causal_lm, word_level_tokenizer


def token_logprobs(logits_B_T_V, target_tokens_B_T):
    """`chunked_scores` of logits given whole (no output layer), as (B, T)."""
    V = logits_B_T_V.shape[-1]
    return chunked_scores(logits_B_T_V.reshape(-1, V), target_tokens_B_T.reshape(-1))[0].view(target_tokens_B_T.shape)


def naive_logprobs(logits_B_T_V, target_tokens_B_T):
    return torch.log_softmax(logits_B_T_V.double(), dim=-1).gather(-1, target_tokens_B_T[..., None]).squeeze(-1)


@pytest.mark.parametrize("chunk_elements", [1 << 24, 7])  # one chunk; one row (V = 7) at a time
def test_token_logprobs_and_gradient_match_log_softmax(monkeypatch, chunk_elements):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 5, 7, generator=g)).requires_grad_()
    targets = torch.randint(0, 7, (3, 5), generator=g)
    upstream = torch.randn(3, 5, generator=g)
    ours = token_logprobs(logits, targets)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), naive_logprobs(logits, targets), rtol=0, atol=1e-6)
    (grad,) = torch.autograd.grad((ours * upstream).sum(), logits)
    (expected,) = torch.autograd.grad((naive_logprobs(logits, targets) * upstream).sum(), logits)
    torch.testing.assert_close(grad.double(), expected.double(), rtol=0, atol=1e-6)


def test_token_logprobs_gradcheck_in_float64(monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 10)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (2, 3))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, targets), (logits,))


def test_token_logprobs_of_bfloat16_logits_are_float32():
    logits = (4 * torch.randn(2, 6, 50)).bfloat16().requires_grad_()
    targets = torch.randint(0, 50, (2, 6))
    ours = token_logprobs(logits, targets)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), naive_logprobs(logits.float(), targets), rtol=0, atol=1e-5)
    ours.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_cross_entropy_is_the_weighted_mean_of_a_naive_loop():
    g = torch.Generator().manual_seed(1)
    logprobs = -torch.rand(3, 4, generator=g)
    weights = torch.tensor([[0, 1, 1, 0], [2, 0.5, 0, 0], [0, 0, 0, 0]])
    total, weight = 0.0, 0.0
    for b in range(3):
        for t in range(4):
            total += -logprobs[b, t].item() * weights[b, t].item()
            weight += weights[b, t].item()
    assert cross_entropy(logprobs, {"weights": weights}).item() == pytest.approx(total / weight, rel=1e-6)
    empty = cross_entropy(logprobs, {"weights": torch.zeros(3, 4)})
    assert empty.item() == 0.0


def test_micro_batch_means_scaled_by_weight_share_give_the_step_mean():
    """The engine's weighted step: Σ over micro-batches of mean_k * W_k / W equals the mean over the step."""
    g = torch.Generator().manual_seed(2)
    logprobs = -torch.rand(6, 5, generator=g)
    weights = (torch.rand(6, 5, generator=g) > 0.4).float()
    step = cross_entropy(logprobs, {"weights": weights})
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]
    scaled = sum(cross_entropy(logprobs[p], {"weights": weights[p]}) * weights[p].sum() / weights.sum()
                 for p in parts)
    torch.testing.assert_close(scaled, step)


# ------------------------------------------------------------------------------------------ packing

@pytest.fixture(scope="module")
def packing_setup():
    tok = word_level_tokenizer(list("abcdefgh+=0123456789"))
    g = torch.Generator().manual_seed(3)
    words = list("abcdefgh+=0123456789")
    examples = []
    for i in range(7):
        n = int(torch.randint(3, 14, (1,), generator=g))
        text = " ".join(words[int(j)] for j in torch.randint(0, len(words), (n,), generator=g))
        examples.append({"prompt": text, "completion": " " + words[i]} if i % 2 else {"text": text})
    kept, _ = tokenize_examples(examples, tok, max_length=32)
    return tok, kept


def per_example_losses(logprobs_B_T, batch):
    """Each example's mean loss, found by walking the rows: a new example starts where position_ids is 0."""
    out = []
    for row in range(batch["position_ids"].shape[0]):
        starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() + [batch["position_ids"].shape[1]]
        for a, b in zip(starts, starts[1:]):
            if batch["weights"][row, a:b].sum() > 0:  # a padded tail is its own block with weight 0
                out.append(cross_entropy(logprobs_B_T[row:row + 1, a:b],
                                         {"weights": batch["weights"][row:row + 1, a:b]}))
    return torch.stack(out)


def _in_packed_order(examples, row_len):
    from paperloop.lm.data import pack_rows
    return [examples[i] for row in pack_rows([len(e) for e in examples], row_len) for i in row]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_example_has_the_same_loss_packed_and_padded_with_the_default_config(packing_setup, attn):
    tok, examples = packing_setup
    # float64: the bound holds on any CPU, and a leak (about 1e-2 here) is ten orders above it
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=2, num_heads=2, attn_implementation=attn).double()
    assert model.config.use_cache  # the default that makes transformers skip the packed-sequence mask
    packed = pack_batch(examples, row_len=40, pad_id=tok.pad_token_id)
    assert packed["input_ids"].shape[0] < len(examples)  # rows really hold several examples
    padded = pad_batch(_in_packed_order(examples, 40), pad_id=tok.pad_token_id)
    loss_packed = per_example_losses(forward_logprobs(model, packed).logprobs, packed)
    loss_padded = per_example_losses(forward_logprobs(model, padded).logprobs, padded)
    # transformers' eager attention takes its softmax in float32 even for a float64 model: ~1e-8 of rounding there
    atol = {"sdpa": 1e-12, "eager": 1e-6}[attn]
    torch.testing.assert_close(loss_packed, loss_padded, rtol=0, atol=atol)
    (grad_packed,) = torch.autograd.grad(loss_packed.sum(), model.model.embed_tokens.weight)
    (grad_padded,) = torch.autograd.grad(loss_padded.sum(), model.model.embed_tokens.weight)
    torch.testing.assert_close(grad_packed, grad_padded, rtol=0, atol=atol)


def test_the_same_comparison_catches_the_leak_when_use_cache_is_left_to_the_config(packing_setup):
    """What `forward_logprobs` guards against: with the config's use_cache=True and no explicit False,
    transformers ignores the example boundaries in position_ids and packed examples attend to each other."""
    tok, examples = packing_setup
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=2, num_heads=2).double()

    def leaky_logprobs(batch):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        return token_logprobs(logits, batch["target_tokens"])

    packed = pack_batch(examples, row_len=40, pad_id=tok.pad_token_id)
    padded = pad_batch(_in_packed_order(examples, 40), pad_id=tok.pad_token_id)
    gap = (per_example_losses(leaky_logprobs(packed), packed)
           - per_example_losses(leaky_logprobs(padded), padded)).abs()
    assert gap.max() > 1e-3  # the packed-vs-padded check above would fail
    assert gap[0] < 1e-12  # a row's first example sees nothing before it: only later ones leak


def spy_on_chunks(monkeypatch) -> list[tuple[int, int]]:
    """The (rows, V) of every chunk of logits made, forward and backward."""
    made, make = [], losses._chunk_logits

    def recording(*args):
        x_n_V, tanh_n_V = make(*args)
        made.append(tuple(x_n_V.shape))
        return x_n_V, tanh_n_V

    monkeypatch.setattr(losses, "_chunk_logits", recording)
    return made


def full_scores(model, batch, temperature=1.0):
    """The reference: every position's logits made whole by the model, then log-softmax over them."""
    logits_B_T_V = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    logprobs_B_T_V = torch.log_softmax(logits_B_T_V.double() / temperature, dim=-1)
    trained = batch["weights"] != 0
    logprobs = logprobs_B_T_V.gather(-1, batch["target_tokens"][..., None]).squeeze(-1) * trained
    entropy = -(logprobs_B_T_V.exp() * logprobs_B_T_V).sum(-1) * trained
    greedy = (logits_B_T_V.argmax(-1) == batch["target_tokens"]) & trained
    return logprobs, entropy, greedy


class OwnHead(torch.nn.Linear):
    """An output layer that is not a plain nn.Linear (as a LoRA-wrapped one is not): the autograd path."""


@pytest.mark.parametrize("head", ["untied", "tied", "with a bias", "own head class"])
def test_chunked_scores_and_their_gradients_are_those_of_the_full_logits(packing_setup, monkeypatch, head):
    """The output layer runs on the trained positions only, in chunks (3 rows here), each recomputed in the
    backward; log-probs, entropy, argmax and every gradient are those of the full (B, T, V) logits, in float64."""
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 3 * 28)  # V = 28: three rows per chunk
    tok, examples = packing_setup
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=2, num_heads=2,
                           tie_word_embeddings=head == "tied").double()
    if head in ("with a bias", "own head class"):
        own = (OwnHead if head == "own head class" else torch.nn.Linear)(32, len(tok), bias=True, dtype=torch.float64)
        with torch.no_grad():
            own.weight.copy_(model.lm_head.weight)
            own.bias.normal_(generator=torch.Generator().manual_seed(1))
        model.lm_head = own
    if head == "own head class":
        made = []
        monkeypatch.setattr(model.lm_head, "forward", lambda h, f=model.lm_head.forward: made.append((len(h), 0)) or f(h))
    assert model.lm_head.out_features == 28
    batch = pad_batch(examples, pad_id=tok.pad_token_id)
    trained = batch["weights"] != 0
    N = int(trained.sum())
    seen = []
    if head != "own head class":
        made = spy_on_chunks(monkeypatch)
    handle = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    scores = forward_logprobs(model, batch, temperature=0.7, entropy="trained", greedy=True)
    handle.remove()
    assert seen[:2] == [(1, 2, 32), (2, 32)]  # the model's own call on two rows, and ours to check the logits by
    chunks = made[2:] if head == "own head class" else made  # the module's own calls: the two above, then chunks
    assert [rows for rows, _ in chunks] == [3] * (N // 3) + ([N % 3] if N % 3 else [])
    logprobs, entropy, greedy = full_scores(model, batch, temperature=0.7)
    torch.testing.assert_close(scores.logprobs, logprobs, rtol=0, atol=1e-12)
    torch.testing.assert_close(scores.entropy, entropy, rtol=0, atol=1e-12)
    assert torch.equal(scores.greedy, greedy) and bool(greedy.any()) and not bool(greedy.all())
    upstream = torch.randn(trained.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    made.clear()
    grads = torch.autograd.grad((scores.logprobs * upstream).sum() + scores.entropy.sum(), list(model.parameters()))
    assert len(made) == len(range(0, N, 3))  # the backward recomputed each chunk
    if head in ("with a bias", "own head class"):
        assert grads[-1].shape == (len(tok),) and grads[-1].abs().sum() > 0  # the bias is trained too
    full_grads = torch.autograd.grad((logprobs * upstream).sum() + entropy.sum(), list(model.parameters()))
    for g, f in zip(grads, full_grads):
        torch.testing.assert_close(g, f, rtol=0, atol=1e-12)


def test_no_tensor_of_tokens_by_vocabulary_is_made_or_kept(packing_setup, monkeypatch):
    """What would fail if the full logits came back: every output of the output layer is at most one chunk
    (forward and backward), and what autograd keeps for the backward holds no logits at all."""
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 4 * 28)
    tok, examples = packing_setup
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=2, num_heads=2)
    batch = pad_batch(examples, pad_id=tok.pad_token_id)
    kept, made = [], spy_on_chunks(monkeypatch)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def keep(t):
        if t.untyped_storage().data_ptr() not in weights:  # the output layer's weight (V, H) is kept, of course
            kept.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        scores = forward_logprobs(model, batch, entropy="detached", greedy=True)
    cross_entropy(scores.logprobs, batch).backward()
    assert len(made) > 4 and max(rows * V for rows, V in made) <= 4 * 28
    assert not [shape for shape in kept if shape[-1] == 28], kept  # a (.., V) tensor kept for the backward


def test_a_model_whose_output_layer_cannot_be_hooked_gives_the_same_scores(packing_setup):
    """A wrapper that hides get_output_embeddings (as a compiled model does): every position's logits are made
    by the model and scored by the same chunks, so the caller sees the same numbers either way."""
    tok, examples = packing_setup
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=2, num_heads=2).double()

    class Opaque(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    batch = pad_batch(examples, pad_id=tok.pad_token_id)
    hooked = forward_logprobs(model, batch, entropy="detached", greedy=True)
    opaque = forward_logprobs(Opaque(model), batch, entropy="detached", greedy=True)
    for ours, theirs in zip(opaque, hooked):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_only_trained_false_scores_every_position(packing_setup):
    tok, examples = packing_setup
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=2, num_heads=2).double()
    batch = pad_batch(examples, pad_id=tok.pad_token_id)
    everywhere = dict(batch, weights=torch.ones_like(batch["weights"]))
    torch.testing.assert_close(forward_logprobs(model, batch, only_trained=False).logprobs,
                               full_scores(model, everywhere)[0], rtol=0, atol=1e-12)


def post_processing_model(kind: str, vocab: int):
    """Gemma 2 caps its logits (cap * tanh(logits / cap)) after the output layer; Cohere scales them."""
    torch.manual_seed(0)
    if kind == "final_logit_softcapping":
        from transformers import Gemma2Config, Gemma2ForCausalLM

        return Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                              head_dim=16, final_logit_softcapping=0.5, pad_token_id=0,
                                              initializer_range=0.5)).double()
    from transformers import CohereConfig, CohereForCausalLM

    return CohereForCausalLM(CohereConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2, logit_scale=0.25,
                                          pad_token_id=0, initializer_range=0.5)).double()


@pytest.mark.parametrize("kind", ["final_logit_softcapping", "logit_scale"])
def test_logits_post_processed_by_the_model_are_scored_as_the_model_does(packing_setup, kind):
    """The chunks apply the model's own post-processing, in the forward and in the gradient."""
    tok, examples = packing_setup
    model = post_processing_model(kind, len(tok))
    batch = pad_batch(examples, pad_id=tok.pad_token_id)
    logprobs, entropy, _ = full_scores(model, batch)
    scores = forward_logprobs(model, batch, entropy="trained")
    torch.testing.assert_close(scores.logprobs, logprobs, rtol=0, atol=1e-12)
    torch.testing.assert_close(scores.entropy, entropy, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(scores.logprobs.sum() + scores.entropy.sum(), list(model.parameters()))
    full_grads = torch.autograd.grad(logprobs.sum() + entropy.sum(), list(model.parameters()))
    for g, f in zip(grads, full_grads):
        torch.testing.assert_close(g, f, rtol=0, atol=1e-12)


class HeadExposed(torch.nn.Module):
    """A wrapper of a causal LM that shows its output layer (so the hook finds it) and forwards as subclasses say."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_output_embeddings(self):
        return self.inner.lm_head


def test_a_model_that_post_processes_its_logits_otherwise_is_refused_by_name(packing_setup):
    """Logits changed after the output layer in a way not known here would make the chunks score another
    model: the one row the model scores itself gives it away, and the forward is refused, naming the class."""
    tok, examples = packing_setup
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=2, num_heads=2)

    class Doubled(HeadExposed):
        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.logits = 2 * out.logits
            return out

    batch = pad_batch(examples, pad_id=tok.pad_token_id)
    with pytest.raises(RuntimeError, match=r"Doubled: its forward changes the output layer's logits in a way the "
                                           r"chunked scoring does not know"):
        forward_logprobs(Doubled(model), batch)
    assert not model.lm_head._forward_pre_hooks  # the hook is gone after the error
    forward_logprobs(model, batch)  # the plain model passes


@pytest.mark.parametrize("second_input", ["hidden_states", "other_shape"])
def test_a_model_that_calls_its_output_layer_twice_is_refused_by_name(packing_setup, second_input):
    """The hook cuts the first call's hidden states to the trained positions; a second call (an auxiliary head
    sharing the layer, say) would score cut states against the wrong positions: refused with what to do instead,
    whatever the shape of the second call's input."""
    tok, examples = packing_setup
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=2, num_heads=2)

    class TwoHeads(HeadExposed):
        def forward(self, **kwargs):
            out = self.inner(**kwargs, output_hidden_states=True)
            hidden = out.hidden_states[-1]
            self.inner.lm_head(hidden if second_input == "hidden_states" else hidden[:1, :2])
            return out

    batch = pad_batch(examples, pad_id=tok.pad_token_id)
    with pytest.raises(RuntimeError, match=r"TwoHeads calls its output layer 2 times in one forward"):
        forward_logprobs(TwoHeads(model), batch)
    assert not model.lm_head._forward_pre_hooks  # the hook is gone after the error


# ------------------------------------------------------------------------------------------ entropy


def token_entropy(logits_B_T_V):
    V = logits_B_T_V.shape[-1]
    targets_N = torch.zeros(logits_B_T_V.shape[:-1], dtype=torch.long).reshape(-1)
    return chunked_scores(logits_B_T_V.reshape(-1, V), targets_N, entropy="detached")[1].view(logits_B_T_V.shape[:-1])


def test_token_entropy_matches_categorical_and_chunks(monkeypatch):
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0)) * 3
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(token_entropy(logits), expected)
    monkeypatch.setattr("paperloop.lm.losses.CHUNK_ELEMENTS", 23)  # two rows of 11 per chunk
    torch.testing.assert_close(token_entropy(logits.bfloat16()), torch.distributions.Categorical(
        logits=logits.bfloat16().float()).entropy())
