"""Tokenization, loss masks, truncation, loading, padding and packing (paperloop.lm.data), against
hand-computed token ids and masks from a word-level tokenizer whose ids are known:

    <pad>=0 <bos>=1 <eos>=2 <unk>=3 <|system|>=4 <|user|>=5 <|assistant|>=6 <|end|>=7
    a=8 b=9 c=10 +=11 ==12 1=13 2=14 3=15
"""

import json

import pytest
import torch

from paperloop.lm.plans import PackedPlan, PaddedPlan
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from paperloop.lm.data import (TokenizedExample, load_examples, pack_batch, pack_rows, pad_batch,
                               show_mask, tokenize_examples)
from paperloop.lm.plans import PackedPlan, PaddedPlan
from paperloop.models import bpe_tokenizer, word_level_tokenizer

CHAT = [{"role": "system", "content": "c"}, {"role": "user", "content": "a + b"},
        {"role": "assistant", "content": "3"}, {"role": "user", "content": "c"},
        {"role": "assistant", "content": "1 2"}]


@pytest.fixture(scope="module")
def tok():
    return word_level_tokenizer(["a", "b", "c", "+", "=", "1", "2", "3"])


@pytest.fixture(scope="module")
def bpe():
    texts = ["2 + 2 = 4", "3 + 1 = 4", "the cat sat on the mat", "naïve café"] * 30
    return bpe_tokenizer(texts, vocab_size=320)


def one(example, tokenizer, max_length=64, **kwargs) -> TokenizedExample:
    kept, skipped = tokenize_examples([example], tokenizer, max_length, **kwargs)
    assert not skipped
    return kept[0]


def assert_example(example, input_ids, weights):
    """`input_ids` is the whole token sequence s; the example must hold s[:-1], s[1:] and `weights`."""
    assert example.input_ids.tolist() == input_ids[:-1]
    assert example.target_tokens.tolist() == input_ids[1:]
    assert example.weights.tolist() == weights
    assert example.input_ids.dtype == torch.long and example.weights.dtype == torch.float32


# ----------------------------------------------------------------------------------- masks by shape

def test_prompt_completion_trains_completion_and_eos_only(tok):
    example = one({"prompt": "a + b =", "completion": " 3", "id": "ignored"}, tok)
    #                 <bos> a  +  b  =  3  <eos>
    assert_example(example, [1, 8, 11, 9, 12, 15, 2], [0, 0, 0, 0, 1, 1])
    assert example.num_trained == 2 and example.truncated == 0


def test_prompt_completion_train_prompt_trains_everything_but_bos(tok):
    example = one({"prompt": "a + b =", "completion": " 3"}, tok, train_prompt=True)
    assert_example(example, [1, 8, 11, 9, 12, 15, 2], [1, 1, 1, 1, 1, 1])


def test_text_trains_everything_and_eos(tok):
    assert_example(one({"text": "a b c"}, tok), [1, 8, 9, 10, 2], [1, 1, 1, 1])


def test_text_already_ending_in_eos_gets_no_second_one(tok):
    assert_example(one({"text": "a b <eos>"}, tok), [1, 8, 9, 2], [1, 1, 1])


def test_tokens_a_post_processor_adds_are_untrained_except_its_eos(tok):
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(  # a tokenizer that frames text itself
        single="<bos> <|system|> $A <eos>", special_tokens=[("<bos>", 1), ("<|system|>", 4), ("<eos>", 2)])
    framing = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>")
    #                                <bos> <|system|> a  b  <eos>   (one <eos>, trained)
    assert_example(one({"text": "a b"}, framing), [1, 4, 8, 9, 2], [0, 1, 1, 1])
    assert_example(one({"prompt": "a", "completion": " b"}, framing), [1, 4, 8, 9, 2], [0, 0, 1, 1])


def test_chat_trains_assistant_turns_with_their_end_of_turn(tok):
    example = one({"messages": CHAT}, tok)
    # <bos> <|system|> c <|end|> <|user|> a + b <|end|> <|assistant|> 3 <|end|> <|user|> c <|end|>
    #   <|assistant|> 1 2 <|end|>           (no <eos> appended: the template's <|end|> ends a turn)
    s = [1, 4, 10, 7, 5, 8, 11, 9, 7, 6, 15, 7, 5, 10, 7, 6, 13, 14, 7]
    m = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1]
    assert_example(example, s, m[1:])


def test_show_mask_marks_trained_tokens(tok, bpe):
    """What a user sees for each shape:

    <bos> a + b =[[ 3 <eos>]]
    <bos> <|system|> c <|end|> <|user|> a + b <|end|> <|assistant|>[[ 3 <|end|>]] <|user|> c <|end|> <|assistant|>[[ 1 2 <|end|>]]
    <bos>2 + 2 =[[ 4<eos>]]
    """
    assert show_mask(one({"prompt": "a + b =", "completion": " 3"}, tok), tok) == "<bos> a + b =[[ 3 <eos>]]"
    assert show_mask(one({"messages": CHAT}, tok), tok) == (
        "<bos> <|system|> c <|end|> <|user|> a + b <|end|> <|assistant|>[[ 3 <|end|>]] <|user|> c <|end|> "
        "<|assistant|>[[ 1 2 <|end|>]]")
    assert show_mask(one({"prompt": "2 + 2 =", "completion": " 4"}, bpe), bpe) == "<bos>2 + 2 =[[ 4<eos>]]"
    assert show_mask(one({"text": "a b"}, tok), tok) == "<bos>[[ a b <eos>]]"


# ------------------------------------------------------------------------------- BPE boundaries

def _trained_text(example, tokenizer):
    targets = example.target_tokens[example.weights > 0].tolist()
    assert targets[-1] == tokenizer.eos_token_id
    return tokenizer.decode(targets[:-1])


def test_bpe_token_straddling_the_boundary_is_trained(bpe):
    # " 4" is one token; with the space in the prompt it straddles the boundary and must still be trained
    # (the model has to produce it to produce "4").
    assert bpe.tokenize(" 4") == ["Ġ4"]
    example = one({"prompt": "2 + 2 = ", "completion": "4"}, bpe)
    assert _trained_text(example, bpe) == " 4"
    assert bpe.decode(example.target_tokens[example.weights == 0].tolist()) == "2 + 2 ="


@pytest.mark.parametrize("prompt, completion", [
    ("2 + 2 =", " 4"), ("the cat", " sat on the mat"), ("naïve caf", "é"), ("naïve", " café"),
    ("", "the cat"), ("the c", "at"), ("3 + 1 = ", " 4"),
])
def test_bpe_masks_split_the_text_at_the_completion(bpe, prompt, completion):
    """Untrained tokens (after BOS) decode to a prefix of the prompt and trained ones to the rest: every
    completion character is trained, no prompt character except inside a straddling token."""
    example = one({"prompt": prompt, "completion": completion}, bpe)
    ids = [*example.input_ids.tolist(), int(example.target_tokens[-1])]
    trained = [False, *(example.weights > 0).tolist()]
    first = trained.index(True)
    assert not any(trained[:first]) and all(trained[first:])
    head, tail = bpe.decode(ids[1:first]), bpe.decode(ids[first:-1])
    assert head + tail == prompt + completion and len(head) <= len(prompt) and tail.endswith(completion)


def test_bpe_chat_trains_exactly_the_assistant_turns(bpe):
    example = one({"messages": CHAT}, bpe)
    trained = example.target_tokens[example.weights > 0].tolist()
    assert bpe.decode(trained) == "3<|end|>1 2<|end|>"


# ------------------------------------------------------------------------------- truncation, skips

def test_truncation_keeps_the_start_and_counts_the_cut(tok):
    example = one({"text": "a b c a b c"}, tok, max_length=3)  # 8 tokens with <bos>, <eos>
    assert_example(example, [1, 8, 9, 10], [1, 1, 1])
    assert example.truncated == 4 and len(example) == 3


def test_truncation_mid_chat_keeps_the_first_turn(tok):
    example = one({"messages": CHAT}, tok, max_length=11)
    assert example.weights.tolist() == [0] * 9 + [1, 1] and example.truncated == 7


def test_example_with_nothing_trained_after_truncation_is_skipped_and_reported(tok):
    examples = [{"prompt": "a b c", "completion": " 1"},             # fits: 6 tokens
                {"prompt": "a b c a b c =", "completion": " 3"},     # completion cut off
                {"text": "c"}]
    kept, skipped = tokenize_examples(examples, tok, max_length=5)
    assert [example.index for example in kept] == [0, 2]
    assert skipped == [(1, "no trained tokens after truncation to max_length=5 (cut 4 tokens)")]


def test_no_zero_weight_rows_ever(tok):
    examples = [{"prompt": "a " * n, "completion": " b"} for n in range(1, 10)]
    kept, skipped = tokenize_examples(examples, tok, max_length=6)
    assert all(example.num_trained > 0 for example in kept)
    assert len(kept) + len(skipped) == 9 and len(skipped) == 4  # prompts of 6+ words lose the completion


# ---------------------------------------------------------------------------------- malformed input

GOOD = {"prompt": "a", "completion": " b"}


@pytest.mark.parametrize("bad, message", [
    (["a", "b"], "expected a dict, got list"),
    ({"question": "a"}, "needs 'prompt' and 'completion', 'messages', or 'text'"),
    ({"prompt": "a"}, "has 'prompt' but no 'completion'"),
    ({"completion": "a"}, "has 'completion' but no 'prompt'"),
    ({"text": "a", "messages": CHAT}, r"mixes shapes \(keys \['messages', 'text'\]\)"),
    ({"prompt": 1, "completion": "a"}, "'prompt' must be a string, got int"),
    ({"prompt": "a", "completion": None}, "has 'prompt' but no 'completion'"),  # None: as absent
    ({"prompt": "a", "completion": ""}, "empty 'completion'"),
    ({"text": ""}, "empty 'text'"),
    ({"text": ["a"]}, "'text' must be a string"),
    ({"messages": "a b"}, "'messages' must be a non-empty list"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "message 0: expected a dict with 'role' and 'content'"),
    ({"messages": ["hi"]}, "message 0: expected a dict"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]},
     "message 1: 'content' must be a string, got int"),
    ({"messages": [{"role": "tool", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "message 0: unknown role 'tool'"),
    ({"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]},
     "no assistant turn"),
])
def test_malformed_example_is_an_error_naming_its_index(tok, bad, message):
    with pytest.raises(ValueError, match=rf"example 2\b.*{message}"):
        tokenize_examples([GOOD, GOOD, bad, GOOD], tok, max_length=16)


def test_chat_template_that_rewrites_history_is_an_error(tok):
    # Like templates that drop earlier turns' reasoning: the last assistant turn renders differently.
    rewriting = tok.__class__(tokenizer_object=tok.backend_tokenizer, bos_token="<bos>", eos_token="<eos>",
                              chat_template="{% for m in messages %}<|{{ m.role }}|>"
                                            "{% if m.role == 'assistant' and not loop.last %}a"
                                            "{% else %}{{ m.content }}{% endif %}<|end|>{% endfor %}")
    with pytest.raises(ValueError, match=r"example 1: the chat template does not render .* prefix"):
        tokenize_examples([GOOD, {"messages": CHAT}], rewriting, max_length=32)


def test_chat_template_errors_and_missing_template_name_the_example(tok):
    raising = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>",
                            chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="example 1: the chat template failed: roles must alternate"):
        tokenize_examples([GOOD, {"messages": CHAT}], raising, max_length=32)
    plain = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>")
    with pytest.raises(ValueError, match="example 0: a chat example needs a tokenizer with a chat_template"):
        tokenize_examples([{"messages": CHAT}], plain, max_length=32)


def test_bad_max_length_and_slow_tokenizer_are_errors(tok):
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        tokenize_examples([GOOD], tok, max_length=0)

    class Slow:
        is_fast = False
    with pytest.raises(TypeError, match="Slow is not a fast tokenizer"):
        tokenize_examples([GOOD], Slow(), max_length=8)


# ---------------------------------------------------------------------------------------- loading

def test_jsonl_loads_skipping_blank_lines(tok, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a +", "completion": " b"}\n\n{"text": "c"}\n')
    assert load_examples(path) == [{"prompt": "a +", "completion": " b"}, {"text": "c"}]
    kept, _ = tokenize_examples(str(path), tok, max_length=8)
    assert [example.input_ids.tolist() for example in kept] == [[1, 8, 11, 9], [1, 10]]


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n\n{"text": "b",}\n', r"train.jsonl:3: not valid JSON"),
    ('{"text": "a"}\n["text", "b"]\n', r"train.jsonl:2: expected a JSON object, got list"),
])
def test_bad_jsonl_line_is_an_error_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_examples(path)


def test_map_style_datasets_load_and_iterables_do_not(tok):
    class MapStyle(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return [{"text": "a"}, {"text": "b c"}][i]

    kept, _ = tokenize_examples(MapStyle(), tok, max_length=8)
    assert [example.input_ids.tolist() for example in kept] == [[1, 8], [1, 9, 10]]
    with pytest.raises(TypeError, match="got generator"):
        load_examples(x for x in [GOOD])
    with pytest.raises(TypeError, match="got dict"):
        load_examples(GOOD)


# --------------------------------------------------------------------------------- padding, packing

def _examples(tok):
    kept, _ = tokenize_examples([{"prompt": "a + b =", "completion": " 3"},  # 6 positions
                                 {"text": "c c"},                          # 3 positions
                                 {"text": "a b c"}],                       # 4 positions
                                tok, max_length=16)
    return kept


def test_pad_batch_right_pads_with_zero_weight(tok):
    batch = pad_batch(_examples(tok)[:2], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 8, 11, 9, 12, 15], [1, 10, 10, 0, 0, 0]]
    assert batch["target_tokens"].tolist() == [[8, 11, 9, 12, 15, 2], [10, 10, 2, 0, 0, 0]]
    assert batch["weights"].tolist() == [[0, 0, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5]] * 2
    assert batch["weights"].dtype == torch.float32 and batch["input_ids"].dtype == torch.long


def test_pack_batch_rows_restart_positions_per_example(tok):
    batch = pack_batch(_examples(tok), row_len=10, pad_id=0)  # first fit: [6 + 3, pad 1], [4, pad 6]
    assert batch["input_ids"].tolist() == [[1, 8, 11, 9, 12, 15, 1, 10, 10, 0], [1, 8, 9, 10, 0, 0, 0, 0, 0, 0]]
    assert batch["target_tokens"].tolist() == [[8, 11, 9, 12, 15, 2, 10, 10, 2, 0], [8, 9, 10, 2, 0, 0, 0, 0, 0, 0]]
    assert batch["weights"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]


def test_pack_rows_first_fit_in_order():
    assert pack_rows([5, 5, 5], 10) == [[0, 1], [2]]
    assert pack_rows([6, 5, 4], 10) == [[0, 2], [1]]
    assert pack_rows([3, 8, 2, 7, 1], 10) == [[0, 2, 4], [1], [3]]  # 1 goes back to the first row
    assert pack_rows([], 10) == []


def test_example_longer_than_a_row_is_an_error_naming_it(tok):
    with pytest.raises(ValueError, match="example 1 has 11 positions, more than row_len=10"):
        pack_rows([3, 11], 10)
    examples = _examples(tok)
    with pytest.raises(ValueError, match="example 0 has 6 positions, more than row_len=5"):
        pack_batch(examples, row_len=5, pad_id=0)


def test_a_plan_counts_the_positions_its_own_collation_builds_and_packing_brings_padding_down(tok):
    kept, _ = tokenize_examples([{"text": " ".join("abc"[: 1 + i % 3] * (1 + i % 5))} for i in range(40)],
                                tok, max_length=32)
    lengths = [len(example) for example in kept]
    padded_plan, packed_plan = PaddedPlan(lengths, 0, batch_size=40), PackedPlan(lengths, 0, row_len=32, rows=40)
    padded, packed = padded_plan.collate(kept), packed_plan.collate(kept)
    assert padded_plan.positions(lengths) == padded["input_ids"].numel() == 40 * max(lengths)
    assert packed_plan.positions(lengths) == packed["input_ids"].numel()
    assert 1 - sum(lengths) / packed["input_ids"].numel() < 0.05 < 1 - sum(lengths) / padded["input_ids"].numel()
    assert packed["weights"].sum() == padded["weights"].sum() == sum(example.num_trained for example in kept)


def test_bad_text_is_named_by_file_and_line_or_by_example(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')  # latin-1, not UTF-8, on line 2
    with pytest.raises(ValueError, match=rf"^{path}:2: not UTF-8 text"):
        load_examples(str(path))
    lone = json.loads('{"prompt": "a\\ud800", "completion": " b"}')  # valid JSON, not valid text
    with pytest.raises(ValueError, match=r"example 0: 'prompt': holds '\\ud800' at character 1.*lone surrogate"):
        tokenize_examples([lone], tok, max_length=16)
    chat = {"messages": [{"role": "user", "content": "x\udfff"}, {"role": "assistant", "content": "y"}]}
    with pytest.raises(ValueError, match="example 0, message 0: 'content': holds"):
        tokenize_examples([chat], tok, max_length=16)


def test_columns_filled_with_none_count_as_absent(tok):
    """A datasets.Dataset of mixed shapes has every column in every row, None where a row has no value."""
    rows = [{"prompt": "a", "completion": " b", "messages": None, "text": None},
            {"prompt": None, "completion": None, "messages": None, "text": "a b"},
            {"prompt": None, "completion": None, "text": None,
             "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    kept, skipped = tokenize_examples(rows, tok, max_length=16)
    assert len(kept) == 3 and not skipped


def test_a_completion_that_would_start_the_sequence_is_refused(tok):
    """With a tokenizer that adds no BOS (GPT-2, Qwen style) and an empty prompt, the completion's first token
    sits at position 0, which is never a target: it would silently never train."""
    no_bos = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()),
                                     eos_token="<eos>", pad_token="<pad>")
    no_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    with pytest.raises(ValueError, match="example 0: its completion starts the token sequence"):
        tokenize_examples([{"prompt": "", "completion": "a b"}], no_bos, max_length=16)
    kept, _ = tokenize_examples([{"prompt": "", "completion": "a b"}], tok, max_length=16)  # with a BOS: trained
    assert kept[0].weights[0] == 1


def test_a_chat_template_that_runs_away_is_stopped_with_an_error_naming_it(tok, monkeypatch):
    """A chat template is code that ships with a tokenizer; one with nested long loops would hang tokenization,
    the stop-token probe (RLTrainer's and SFTTrainer's construction) and validation."""
    import paperloop.lm.data as data
    from paperloop.lm import default_stop_token_ids

    monkeypatch.setattr(data, "RENDER_SECONDS", 0.5)
    slow = tok.__class__(tokenizer_object=tok.backend_tokenizer, bos_token="<bos>", eos_token="<eos>",
                         pad_token="<pad>", chat_template="{% for i in range(100000) %}{% for j in range(100000) %}"
                                                          "{% endfor %}{% endfor %}{{ messages[0]['content'] }}")
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(data.ChatTemplateTimeout, match="example 0: the tokenizer's chat template ran for more than"):
        tokenize_examples([chat], slow, max_length=16)
    with pytest.raises(data.ChatTemplateTimeout, match="stop-token probe"):
        default_stop_token_ids(slow, None)


def test_control_tokens_typed_in_text_are_warned_about_or_read_as_text(tok, bpe, caplog):
    import logging

    end = bpe.convert_tokens_to_ids("<|end|>")
    typed = {"prompt": "the <|end|> cat", "completion": " sat"}
    with caplog.at_level(logging.WARNING):
        (as_control,), _ = tokenize_examples([typed], bpe, max_length=32)
    assert end in as_control.input_ids.tolist()  # <|end|> read as the control token
    assert "1 example(s) hold control tokens typed as text (first: example 0, '<|end|>')" in caplog.text
    (as_text,), _ = tokenize_examples([typed], bpe, max_length=32, split_special_tokens=True)
    assert end not in as_text.input_ids.tolist() and len(as_text) > len(as_control)
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(ValueError, match="split_special_tokens cannot apply to a chat"):
        tokenize_examples([chat], tok, max_length=16, split_special_tokens=True)
