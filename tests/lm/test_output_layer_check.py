"""The output layer check: a forward that changes its logits in a way the chunked scoring does not know is refused,
however small the change (a scale of 1.009 trained on log-probs 0.29 nats off) and at whichever position; and the
output layer's gradient when no entropy is asked (every SFT step's path)."""

import pytest
import torch

from paperloop.lm.data import pad_batch, tokenize_examples
from paperloop.lm.losses import chunked_scores, forward_logprobs
from paperloop.models import tiny_causal_lm, word_level_tokenizer


class Changed(torch.nn.Module):
    """A causal LM whose forward multiplies the logits by `scale` at positions from `first` on."""

    def __init__(self, inner, scale, first):
        super().__init__()
        self.inner, self.scale, self.first = inner, scale, first

    def get_output_embeddings(self):
        return self.inner.lm_head

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        logits = out.logits.clone()
        logits[:, self.first:] = logits[:, self.first:] * self.scale
        out.logits = logits
        return out


@pytest.fixture()
def batch_and_model():
    tok = word_level_tokenizer(list("abcdefgh"))
    examples, _ = tokenize_examples([{"prompt": "a b c", "completion": " d e f g h"},
                                     {"prompt": "a b", "completion": " h g f"}], tok, max_length=16)
    return pad_batch(examples, pad_id=tok.pad_token_id), tiny_causal_lm(len(tok), hidden_size=32, num_layers=1,
                                                                         num_heads=2, initializer_range=0.5)


@pytest.mark.parametrize("scale, first", [(1.009, 0), (1.5, 1), (1.009, 1)])
def test_a_small_or_later_change_of_the_logits_is_refused(batch_and_model, scale, first):
    batch, model = batch_and_model
    with pytest.raises(RuntimeError, match="Changed: its forward changes the output layer's logits"):
        forward_logprobs(Changed(model, scale, first), batch)


def test_an_unchanged_forward_passes_in_float32_and_bfloat16(batch_and_model):
    batch, model = batch_and_model
    forward_logprobs(Changed(model, 1.0, 0), batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        forward_logprobs(Changed(tiny_causal_lm(model.config.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                                                initializer_range=0.5), 1.0, 0), batch)


def test_the_output_layers_gradient_without_an_entropy_is_the_full_logits():
    """Every SFT step's path: log-probs alone, no entropy asked; float64, chunks of 3 rows."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    head = torch.nn.Linear(5, 11, dtype=torch.float64)
    targets = torch.randint(0, 11, (7,), generator=g)

    class Logits:
        def __init__(self, head):
            self.head, self.vocabulary, self.scale, self.softcap = head, 11, 1.0, None

        def __call__(self, h):
            return self.head(h)

    import paperloop.lm.losses as losses
    old, losses.CHUNK_ELEMENTS = losses.CHUNK_ELEMENTS, 33
    try:
        logprobs, entropy, greedy = chunked_scores(hidden, targets, Logits(head), temperature=0.7)
    finally:
        losses.CHUNK_ELEMENTS = old
    assert entropy is None and greedy is None
    full = torch.log_softmax(head(hidden) / 0.7, dim=-1).gather(1, targets[:, None])[:, 0]
    upstream = torch.randn(7, dtype=torch.float64, generator=g)
    ours = torch.autograd.grad((logprobs * upstream).sum(), [hidden, head.weight, head.bias])
    theirs = torch.autograd.grad((full * upstream).sum(), [hidden, head.weight, head.bias])
    torch.testing.assert_close(logprobs, full, rtol=0, atol=1e-12)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
