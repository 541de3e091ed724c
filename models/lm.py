"""Tiny causal language models and tokenizers built in-process: nothing is downloaded.

    tok = word_level_tokenizer(["0", "1", "+", "="])            # one token per word (or per character)
    tok = bpe_tokenizer(texts, vocab_size=1000)                  # byte-level BPE trained on `texts`
    model = tiny_causal_lm(len(tok), hidden_size=128, num_layers=2, seed=0)

Both tokenizers are `transformers.PreTrainedTokenizerFast` objects with the same special-token layout
(`<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3, then the chat markers), the layout `tiny_causal_lm`'s config
assumes by default. `tok.save_pretrained(folder)` writes a folder that `AutoTokenizer.from_pretrained(folder)`
loads back identically.

The chat template writes every turn as `<|role|>content<|end|>` after one `<bos>`:

    <bos><|system|>Be brief.<|end|><|user|>2 + 2<|end|><|assistant|>4<|end|>

`apply_chat_template(..., add_generation_prompt=True)` ends the text with `<|assistant|>`, so a model
generates the assistant's content and stops by emitting `<|end|>`. The template carries its own `<bos>`:
tokenize its output with `add_special_tokens=False` (as `apply_chat_template(tokenize=True)` does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|end|>"
ROLE_MARKERS = tuple(f"<|{role}|>" for role in ROLES)
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_MARKERS, END_OF_TURN)  # ids 0, 1, 2, ... in this order

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': expected system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def tiny_causal_lm(vocab_size: int, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                   intermediate_size: int | None = None, max_position_embeddings: int = 512, seed: int = 0,
                   **config_overrides) -> LlamaForCausalLM:
    """A Llama-style decoder (RMSNorm, rotary positions, SwiGLU MLP) from a config built here.

    `intermediate_size` defaults to 4 * hidden_size, the d_ff = 4 d_model that papers quote. Input and output
    embeddings are untied (Llama's default; `tie_word_embeddings=True` ties them): at this size the output
    layer is a sizable share of the weights and papers' small transformers keep it separate, and untied
    weights keep checkpoints and optimizer state free of shared tensors. `bos/eos/pad_token_id` default to
    this module's tokenizer layout (1, 2, 0); pass your tokenizer's ids for another. Other keys in
    `config_overrides` go to `LlamaConfig` (e.g. `attn_implementation="eager"`, `rope_theta`).

    `seed` alone decides the initial weights: the caller's global torch RNG is left as it was.
    """
    # Imported here: transformers' modeling code takes seconds to import, and `paperloop.models` also serves
    # the small classifiers that never need it.
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                    num_attention_heads=num_heads, num_key_value_heads=num_heads,
                    intermediate_size=intermediate_size or 4 * hidden_size,
                    max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlamaConfig(**{**settings, **config_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def word_level_tokenizer(vocab: list[str], per_character: bool = False) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word of `vocab` (ids follow the special tokens, in `vocab`'s order).

    With `per_character=True` every character is its own token, whitespace included (`"7 + 5"` -> `7`, ` `, `+`,
    ` `, `5`), so `vocab` lists single characters and may list a space, a tab or a newline; decoding gives the
    text back exactly. A character outside the vocabulary, a space too, becomes `<unk>` (never dropped). In
    whitespace mode no entry holds whitespace, and decoding joins words with one space: the spacing is not kept.
    """
    _check_vocab(vocab, per_character)
    ids = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *vocab])}
    tokenizer = Tokenizer(models.WordLevel(ids, unk_token=UNK))
    if per_character:
        # Every character stands alone with its own offsets, whitespace too: a space is text the model reads and
        # writes (" hello tib!" is not "hellotib!"), so it is a token or an `<unk>`, never skipped.
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tokenizer.decoder = decoders.Fuse()
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # no decoder: tokens join with a space
    return _wrap(tokenizer)


def bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2's pre-tokenization) trained here on `texts`; any text encodes without `<unk>`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Untrimmed offsets: a token's span keeps its leading space, so a space-only token still covers a
    # character and the loss mask (built from offsets) never drops it.
    return _wrap(tokenizer, processors.ByteLevel(trim_offsets=False))


def _wrap(tokenizer: Tokenizer, processor: processors.PostProcessor | None = None) -> PreTrainedTokenizerFast:
    """Add the special tokens, a post-processor that puts `<bos>` first (Llama's convention; no `<eos>`:
    the data code appends and trains it), and the chat template."""
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    bos = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                        special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    tokenizer.post_processor = bos if processor is None else processors.Sequence([processor, bos])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, chat_template=CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False)


def _check_vocab(vocab: list[str], per_character: bool) -> None:
    seen = set(SPECIAL_TOKENS)
    for token in vocab:
        if not isinstance(token, str) or not token:
            raise ValueError(f"vocab entry {token!r}: a token is a non-empty string")
        if per_character and len(token) != 1:
            raise ValueError(f"vocab entry {token!r}: with per_character=True every entry is one character")
        if not per_character and any(ch.isspace() for ch in token):
            raise ValueError(f"vocab entry {token!r}: a word holds no whitespace (per_character=True keeps spaces "
                             "as tokens)")
        if token in seen:
            raise ValueError(f"vocab entry {token!r} appears twice (or is a special token)")
        seen.add(token)
