"""Tiny causal LMs and in-process tokenizers (paperloop.models.lm): reproducible init, exact token ids and
offsets, the chat template, and save/load round trips through `AutoTokenizer`."""

import pytest
import torch
from transformers import AutoTokenizer

from paperloop.lm.data import tokenize_examples
from paperloop.models import bpe_tokenizer, tiny_causal_lm, word_level_tokenizer

VOCAB = ["a", "b", "c", "+", "=", "1", "2", "3"]  # ids 8.. after <pad> <bos> <eos> <unk> and 4 chat markers
CHAT = [{"role": "system", "content": "c"}, {"role": "user", "content": "a + b"},
        {"role": "assistant", "content": "3"}]
TEXTS = ["the cat sat on the mat", "2 + 2 = 4", "a dog, a cat; naïve café"]


def test_tiny_causal_lm_config_and_untied_embeddings():
    model = tiny_causal_lm(50, hidden_size=32, num_layers=3, num_heads=2)
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size) == (50, 32, 3, 2, 2, 128)
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (0, 1, 2)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    tied = tiny_causal_lm(50, hidden_size=32, tie_word_embeddings=True, attn_implementation="eager")
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert tied.config._attn_implementation == "eager"


def test_tiny_causal_lm_seed_decides_weights_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_causal_lm(40, hidden_size=32, seed=5)
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's stream is where it was
    b = tiny_causal_lm(40, hidden_size=32, seed=5)
    c = tiny_causal_lm(40, hidden_size=32, seed=6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_word_level_ids_offsets_and_unknown_words():
    tok = word_level_tokenizer(VOCAB)
    assert len(tok) == 16
    enc = tok("a + b = 3 zz", return_offsets_mapping=True)
    assert enc["input_ids"] == [1, 8, 11, 9, 12, 15, 3]  # <bos> first; "zz" is <unk>
    assert enc["offset_mapping"] == [(0, 0), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 12)]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.decode([8, 11, 9]) == "a + b"


def test_word_level_per_character():
    tok = word_level_tokenizer(list("0123456789+="), per_character=True)
    enc = tok("12+7=19", return_offsets_mapping=True, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == ["1", "2", "+", "7", "=", "1", "9"]
    assert enc["offset_mapping"] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7)]
    assert tok.decode(enc["input_ids"]) == "12+7=19"


def test_word_level_per_character_keeps_whitespace():
    """A space is a character like any other: listed, it is a token and the text comes back exactly; left out of
    the vocabulary it is an `<unk>` where it stood, never dropped (" hello tib!" once trained as "hellotib!")."""
    tok = word_level_tokenizer(list(" \nhelotib!"), per_character=True)
    text = " hello tib!\nhi"
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == list(text)
    assert enc["offset_mapping"] == [(i, i + 1) for i in range(len(text))]
    assert tok.decode(enc["input_ids"]) == text
    without_space = word_level_tokenizer(list("helotib!"), per_character=True)
    tokens = without_space.convert_ids_to_tokens(without_space(" hello tib!", add_special_tokens=False)["input_ids"])
    assert tokens == ["<unk>", *"hello", "<unk>", *"tib!"]


@pytest.mark.parametrize("vocab, per_character, message", [
    (["a", "a"], False, "appears twice"),
    (["a", "<eos>"], False, "appears twice"),
    (["a b"], False, "holds no whitespace"),
    ([" "], False, "holds no whitespace"),
    ([""], False, "non-empty"),
    (["12"], True, "one character"),
    (["a", " ", " "], True, "appears twice"),
])
def test_word_level_rejects_bad_vocab(vocab, per_character, message):
    with pytest.raises(ValueError, match=message):
        word_level_tokenizer(vocab, per_character=per_character)


def test_chat_template_renders_role_markers_and_generation_prompt():
    tok = word_level_tokenizer(VOCAB)
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == "<bos><|system|>c<|end|><|user|>a + b<|end|><|assistant|>3<|end|>"
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><|system|>c<|end|><|user|>a + b<|end|><|assistant|>"
    assert text.startswith(prompt)  # what a model generates after the prompt is the assistant's turn
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [1, 4, 10, 7, 5, 8, 11, 9, 7, 6, 15, 7]  # one <bos>, each marker one token
    with pytest.raises(Exception, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "a"}], tokenize=False)


def test_bpe_trains_in_process_and_encodes_any_text_losslessly():
    tok = bpe_tokenizer(TEXTS * 20, vocab_size=300)
    assert len(tok) <= 300
    assert tok.convert_ids_to_tokens(list(range(8))) == [
        "<pad>", "<bos>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    unseen = "Zürich 東京 ✓ tabs\tand\nnewlines"
    ids = tok(unseen)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids[1:]) == unseen
    assert len(tok("the cat sat")["input_ids"]) == 4  # merges learned: <bos> the Ġcat Ġsat


def _round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    return AutoTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("build", [
    lambda: word_level_tokenizer(VOCAB),
    lambda: word_level_tokenizer(list("abc+=123 "), per_character=True),
    lambda: bpe_tokenizer(TEXTS * 20, vocab_size=300),
], ids=["word", "char", "bpe"])
def test_tokenizer_save_load_round_trip(build, tmp_path):
    tok = build()
    loaded = _round_trip(tok, tmp_path)
    for text in ["a + b = 3", "a+b=3 c", "the cat; naïve", ""]:
        for special in (True, False):
            a = tok(text, add_special_tokens=special, return_offsets_mapping=True)
            b = loaded(text, add_special_tokens=special, return_offsets_mapping=True)
            assert (a["input_ids"], a["offset_mapping"]) == (b["input_ids"], b["offset_mapping"]), text
        assert tok.decode(tok(text)["input_ids"]) == loaded.decode(tok(text)["input_ids"])
    for generation_prompt in (True, False):
        assert (tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=generation_prompt)
                == loaded.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=generation_prompt))
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token",
                 "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(tok, attr) == getattr(loaded, attr), attr
    assert tok.all_special_tokens == loaded.all_special_tokens and len(tok) == len(loaded)
    examples = [{"prompt": "a + b =", "completion": " 3"}, {"messages": CHAT}, {"text": "c c"}]
    (ours, _), (theirs, _) = (tokenize_examples(examples, t, max_length=32) for t in (tok, loaded))
    for x, y in zip(ours, theirs):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.weights, y.weights)
