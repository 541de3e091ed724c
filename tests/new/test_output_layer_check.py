"""The output layer check: a forward that changes its logits in a way the chunked scoring does not know is refused,
however small the change (a scale of 1.009 trained on log-probs 0.29 nats off) and at whichever position."""

import pytest
import torch

from paperloop.lm.data import pad_batch, tokenize_examples
from paperloop.lm.losses import forward_logprobs
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
