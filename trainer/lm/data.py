"""Language-model data: examples -> tokens with a loss mask -> padded or packed batches, as functions of their
inputs; chat templates (code a tokenizer carries) are rendered under a time limit.

Three example shapes (other keys, e.g. an "id" or an "answer" for `eval_fn`, are carried along unread):

    {"prompt": "2 + 2 =", "completion": " 4"}     text = prompt + completion exactly (put the space yourself);
                                                   the completion and an appended EOS are trained
    {"messages": [{"role": ..., "content": ...}]}  rendered with the tokenizer's chat template; each assistant
                                                   turn's content and its end-of-turn marker are trained
    {"text": "..."}                                 everything after the first token, and an appended EOS

A token sequence s with per-token mask m (L tokens) becomes one `TokenizedExample` of L - 1 positions:
input s[:-1], target s[1:], weights m[1:]. Batches have DESIGN's shape, shared with the RL trainer:

    input_ids      (B, T) long   tokens the model reads
    target_tokens  (B, T) long   the token each position predicts (padding: pad_id)
    weights        (B, T) float  per-token loss weight (0 on prompts and padding)
    position_ids   (B, T) long   0, 1, ... restarting at each example of a packed row

The loss mask comes from character spans mapped to tokens with the tokenizer's offsets: a token that overlaps
a trained span is trained, so a token straddling the prompt/completion boundary is trained (the model must
produce it to produce the completion). A BOS that the tokenizer adds is position 0 and never a target.

    examples = load_examples("train.jsonl")
    tokenized, skipped = tokenize_examples(examples, tokenizer, max_length=64)
    print(show_mask(tokenized[0], tokenizer))          # <bos>2 + 2 =[[ 4<eos>]]
    batch = pack_batch(tokenized[:16], row_len=256, pad_id=tokenizer.pad_token_id)
"""

from __future__ import annotations

import json
import os
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..plans import dataframe_problem
from ..timeouts import time_limit

log = logging.getLogger(__name__)

SHAPES = {"prompt_completion": ("prompt", "completion"), "chat": ("messages",), "text": ("text",)}
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, eq=False)  # eq=False: `==` on tensor fields would raise; examples compare by identity
class TokenizedExample:
    """One example as model positions: `input_ids[i]` predicts `target_tokens[i]` with weight `weights[i]`."""

    index: int                   # position in the source: names the example in skips and errors
    input_ids: torch.Tensor      # (L,) long
    target_tokens: torch.Tensor  # (L,) long: input shifted left by one
    weights: torch.Tensor        # (L,) float32
    truncated: int = 0           # tokens cut from the end to fit max_length

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> float:
        """The example's weight in a step: the sum of its token weights (its trained tokens for 0/1 masks)."""
        return float(self.weights.sum())


# ---------------------------------------------------------------------------------------------- loading

def load_examples(source) -> Sequence[Mapping]:
    """A list of example dicts, any map-style sequence of them (`len` and indexing: a `datasets.Dataset`, a
    torch map-style dataset), or a path to a JSONL file with one JSON object per line (blank lines skipped)."""
    if isinstance(source, (str, os.PathLike)):
        return _read_jsonl(Path(source))
    if (why := dataframe_problem("examples", source)) is not None:
        raise TypeError(why)
    if isinstance(source, Mapping) or not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise TypeError(f"examples: expected a list of dicts, a map-style dataset or a JSONL path, "
                        f"got {type(source).__name__}")
    return source


# Data files that are not JSON lines, told by their first bytes or their suffix, and how `datasets` (whose
# Dataset the trainers take as it is) reads each: a parquet file otherwise fails as "not UTF-8", a CSV as "not JSON".
MAGIC = {b"PAR1": "parquet", b"ARROW1": "arrow", b"\x1f\x8b": "gzip"}
SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".gz": "gzip", ".csv": "csv", ".tsv": "tsv"}
READERS = {"parquet": 'datasets.load_dataset("parquet", data_files=PATH)["train"]',
           "arrow": "datasets.Dataset.from_file(PATH)",
           "gzip": 'datasets.load_dataset("json", data_files=PATH)["train"] (it reads compressed JSON lines)',
           "csv": 'datasets.load_dataset("csv", data_files=PATH)["train"]',
           "tsv": 'datasets.load_dataset("csv", data_files=PATH, delimiter="\\t")["train"]'}


def other_format(path: Path) -> str | None:
    """The format of a data file that is not JSON lines (parquet, arrow, gzip, csv, tsv), else None."""
    with open(path, "rb") as f:
        head = f.read(8)
    found = next((kind for magic, kind in MAGIC.items() if head.startswith(magic)), None)
    return found or SUFFIXES.get(path.suffix.lower())


def _read_jsonl(path: Path) -> list[dict]:
    if (kind := other_format(path)) is not None:
        reader = READERS[kind].replace("PATH", repr(str(path)))
        raise ValueError(f"{path}: is a {kind} file, and a path as examples is read as JSON lines (one JSON object a "
                         f"line); load it with datasets and pass the Dataset: {reader}")
    examples = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(example, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(example).__name__}")
            examples.append(example)
    return examples


# ----------------------------------------------------------------------------------------- tokenization

def tokenize_examples(examples, tokenizer, max_length: int, train_prompt: bool = False,
                      split_special_tokens: bool = False) -> tuple[list[TokenizedExample], list[tuple[int, str]]]:
    """Tokenize and mask every example; returns (kept examples, skipped as (index, reason)).

    `examples`: anything `load_examples` takes. `max_length`: the most positions (tokens the model reads) one
    example keeps; a longer one keeps its start and counts the cut in `truncated`. An example left with no
    trained token is skipped, never kept as a zero-weight row. A malformed example raises `ValueError`
    naming its index. `train_prompt=True` trains prompt tokens of prompt/completion examples too.
    `split_special_tokens=True` reads control tokens typed in a prompt, completion or text (`<|end|>` in a
    user's message) as plain text; otherwise they are read as the control tokens they spell, and warned about.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer: the loss mask needs its offsets")
    examples = load_examples(examples)
    kept, skipped, typed = [], [], []
    for index in range(len(examples)):
        example = tokenize_example(examples[index], tokenizer, max_length, train_prompt, index, split_special_tokens)
        if not split_special_tokens and (found := typed_control_token(examples[index], tokenizer)):
            typed.append((index, found))
        if example.num_trained > 0:
            kept.append(example)
        else:
            cut = f" after truncation to max_length={max_length} (cut {example.truncated} tokens)"
            skipped.append((index, "no trained tokens" + (cut if example.truncated else "")))
    if typed:
        log.warning("%d example(s) hold control tokens typed as text (first: example %d, %r); they are read as the "
                    "control tokens they spell (split_special_tokens=True reads them as text in prompt/completion "
                    "and text examples)", len(typed), *typed[0])
    return kept, skipped


def typed_control_token(example, tokenizer) -> str | None:
    """The first of the tokenizer's special tokens (BOS, EOS, chat markers) spelled out inside an example's text,
    or None."""
    specials = [t for t in tokenizer.all_special_tokens if t] + [
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    texts = [example.get(k) for k in ("prompt", "completion", "text")] + [
        m.get("content") for m in example.get("messages") or [] if isinstance(m, Mapping)]
    return next((t for text in texts if isinstance(text, str) for t in specials if t in text), None)


def tokenize_example(example, tokenizer, max_length: int, train_prompt: bool = False,
                     index: int = 0, split_special_tokens: bool = False, first_trained: int = 0) -> TokenizedExample:
    """One example -> a `TokenizedExample` (possibly with no trained token: `tokenize_examples` skips those). A chat
    trains its assistant turns from message `first_trained` on."""
    shape = example_shape(example, index)
    if shape == "chat" and split_special_tokens:
        raise ValueError(f"example {index}: split_special_tokens cannot apply to a chat, whose template writes "
                         "control tokens of its own into the text; remove typed control tokens from its contents")
    if shape == "chat":
        text, spans = chat_spans(example["messages"], tokenizer, index, first_trained)
        ids, mask = _encode(tokenizer, text, spans, add_special_tokens=False)
    else:
        text = example["prompt"] + example["completion"] if shape == "prompt_completion" else example["text"]
        start = len(example["prompt"]) if shape == "prompt_completion" and not train_prompt else 0
        ids, mask = _encode(tokenizer, text, [(start, len(text))], add_special_tokens=True,
                            split=split_special_tokens)
        if shape == "prompt_completion" and not train_prompt and mask[:1] == [True]:
            # Position 0 is never a target: the completion's first token would silently never be trained.
            raise ValueError(f"example {index}: its completion starts the token sequence (an empty prompt, and a "
                             "tokenizer that adds no BOS), so its first token has nothing to be predicted from; give "
                             "it a prompt, or use a tokenizer that adds a BOS")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"example {index}: the tokenizer has no eos_token to end the {shape} with")
        if not ids or ids[-1] != tokenizer.eos_token_id:
            ids, mask = ids + [tokenizer.eos_token_id], mask + [True]
        mask[-1] = True  # EOS is trained, also when the post-processor or the text itself put it there
    truncated = max(0, len(ids) - (max_length + 1))
    ids, mask = ids[:max_length + 1], mask[:max_length + 1]
    ids_L1 = torch.tensor(ids, dtype=torch.long)  # (L + 1,)
    return TokenizedExample(index, ids_L1[:-1], ids_L1[1:], torch.tensor(mask[1:], dtype=torch.float32),
                            truncated)


def example_shape(example, index: int) -> str:
    """Which of the three shapes `example` is ("prompt_completion", "chat", "text"); ValueError if none."""
    if not isinstance(example, Mapping):
        raise ValueError(f"example {index}: expected a dict, got {type(example).__name__}")
    # A key holding None counts as absent: a datasets.Dataset of mixed shapes fills each row's missing columns so.
    example = {k: v for k, v in example.items() if v is not None}
    present = [name for name, keys in SHAPES.items() if any(k in example for k in keys)]
    if not present:
        raise ValueError(f"example {index}: needs 'prompt' and 'completion', 'messages', or 'text'; "
                         f"it has {sorted(example)}")
    if len(present) > 1:
        keys = sorted(k for name in present for k in SHAPES[name] if k in example)
        raise ValueError(f"example {index}: mixes shapes (keys {keys}); give exactly one of them")
    shape = present[0]
    for key in SHAPES[shape]:
        if key not in example:
            raise ValueError(f"example {index}: has {', '.join(repr(k) for k in SHAPES[shape] if k != key)} "
                             f"but no {key!r}")
    if shape == "chat":
        _check_messages(example["messages"], index)
        return shape
    for key in SHAPES[shape]:
        if not isinstance(example[key], str):
            raise ValueError(f"example {index}: {key!r} must be a string, got {type(example[key]).__name__}")
        check_text(example[key], f"example {index}: {key!r}")
    last = SHAPES[shape][-1]
    if not example[last]:
        raise ValueError(f"example {index}: empty {last!r}: nothing to train on")
    return shape


def _check_messages(messages, index: int) -> None:
    check_messages(messages, f"example {index}")
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"example {index}: a chat with no assistant turn has nothing to train on")


def check_messages(messages, name: str) -> None:
    """A chat: a non-empty list of {"role", "content"} dicts, known roles, text contents; else an error naming the
    example (`name`) and the message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{name}: 'messages' must be a non-empty list of {{'role', 'content'}} dicts")
    for turn, message in enumerate(messages):
        where = f"{name}, message {turn}"
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: expected a dict with 'role' and 'content', got {message!r:.80}")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}: unknown role {message['role']!r} (expected one of {ROLES})")
        if not isinstance(message["content"], str):
            raise ValueError(f"{where}: 'content' must be a string, got {type(message['content']).__name__}")
        check_text(message["content"], f"{where}: 'content'")


def check_text(text: str, where: str) -> None:
    """Text a tokenizer can take: a lone surrogate (from a JSON escape such as \\ud800) is not UTF-8, and would
    fail deep inside the tokenizer without saying which example holds it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: holds {text[e.start:e.end]!r} at character {e.start}, which is not valid "
                         "Unicode text (a lone surrogate)") from None


def chat_spans(messages: list[dict], tokenizer, index: int = 0,
               first_trained: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The chat rendered as text, and each assistant turn's trained character span in it (the turns from message
    `first_trained` on: a preference pair's completion, not the assistant turns of its prompt).

    A turn's span runs from where its content starts (the end of the conversation before it rendered with
    `add_generation_prompt=True`) to the end of the conversation up to and including it, so the template's
    end-of-turn marker is trained. transformers' `return_assistant_tokens_mask` is not used: it needs
    `{% generation %}` tags in the template and silently returns all zeros without them.
    """
    if tokenizer.chat_template is None:
        raise ValueError(f"example {index}: a chat example needs a tokenizer with a chat_template")
    full = _render(tokenizer, messages, False, index)
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant" or turn < first_trained:
            continue
        before = _render(tokenizer, messages[:turn], True, index)
        through = _render(tokenizer, messages[:turn + 1], False, index)
        for prefix in (before, through):
            if not full.startswith(prefix):
                raise ValueError(
                    f"example {index}: the chat template does not render the conversation up to message "
                    f"{turn} as a prefix of the whole (it rewrites earlier turns), so assistant spans cannot "
                    f"be located; prefix ends {prefix[-60:]!r}")
        spans.append((len(before), len(through)))
    return full, spans


def prompt_ids(prompt: str | list[dict], tokenizer, split_special_tokens: bool = False,
               where: str = "a conversation") -> list[int]:
    """The token ids a model continues from — the one way a prompt becomes ids (SFT's generation prompts, RL's
    prompts, an environment's first observation): a prompt string with the tokenizer's special tokens (BOS), or
    chat messages rendered with the template's generation prompt (the template adds its own specials).
    `split_special_tokens`: control tokens typed in a prompt string are read as text. `where` names the prompt in
    a chat template's error."""
    if isinstance(prompt, str):
        return tokenizer(prompt, split_special_tokens=split_special_tokens)["input_ids"]
    text = render_chat(tokenizer, prompt, add_generation_prompt=True, where=where)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# A chat template is code that ships with a tokenizer (a checkpoint's, a hub folder's): one with nested long loops
# would hang the trainer's construction. Rendering one conversation takes microseconds; this is a hang.
RENDER_SECONDS = 10.0


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool, where: str = "a conversation") -> str:
    """The chat template's text of `messages`, or a ValueError naming `where` when the template fails or runs
    past RENDER_SECONDS (checked on the main thread, with SIGALRM, when no other timer is set; elsewhere the
    template runs unbounded)."""
    def render():
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    try:
        with time_limit(RENDER_SECONDS, _TemplateTimeout):
            return render()
    except _TemplateTimeout:
        raise ChatTemplateTimeout(f"{where}: the tokenizer's chat template ran for more than {RENDER_SECONDS:g} s rendering "
                         "one conversation (a template with runaway loops?); fix or replace tokenizer.chat_template"
                         ) from None
    except Exception as e:  # a template's raise_exception (e.g. roles must alternate) or a Jinja error
        raise ValueError(f"{where}: the chat template failed: {e}") from e


class _TemplateTimeout(BaseException):  # not an Exception: a template's own error handling must not catch it
    pass


class ChatTemplateTimeout(ValueError):
    """A chat template ran past RENDER_SECONDS."""


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, index: int) -> str:
    return render_chat(tokenizer, messages, add_generation_prompt, where=f"example {index}")


def _encode(tokenizer, text: str, spans: list[tuple[int, int]], add_special_tokens: bool, split: bool = False
            ) -> tuple[list[int], list[bool]]:
    """Token ids of `text` and whether each token overlaps a span; tokens the post-processor added (BOS)
    are never trained. `split`: control tokens spelled in the text are read as text."""
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                    split_special_tokens=split)
    mask = [source is not None and any(_overlaps(start, end, a, b) for a, b in spans)
            for source, (start, end) in zip(enc.sequence_ids(), enc["offset_mapping"])]
    return list(enc["input_ids"]), mask


def _overlaps(start: int, end: int, a: int, b: int) -> bool:
    # A token with an empty offset range (some tokenizers trim a space-only token to nothing) counts as
    # lying at its start.
    return start < b and (end > a or start == end >= a)


# ------------------------------------------------------------------------------------------- batches

def pad_batch(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """One example per row, right-padded to the longest: padding has weight 0 and, being after every real
    token, is never attended to by one under the causal mask (no attention mask needed)."""
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    T = max(len(example) for example in examples)
    batch = _empty_batch(len(examples), T, pad_id)
    for row, example in enumerate(examples):
        _place(batch, row, 0, example)
    batch["position_ids"][:] = torch.arange(T)
    return batch


def first_fit(lengths: Sequence[int], row_len: int, max_rows: int | None = None, start: int = 0
              ) -> tuple[list[list[int]], int]:
    """Pack examples of these lengths, from `start` on, into rows of `row_len` positions, first fit in the given
    order: each example, whole, goes into the first row with room, or a new row when none has. With `max_rows`,
    stop at the first example that would need one row more. Returns (rows as lists of indices into `lengths`,
    in order of creation, examples in given order; the index of the first example not placed, len(lengths)
    when all were).

    The one packing rule: a packed batch's rows (`pack_batch`) and a token-budget plan's micro-batches
    (`lm.plans.PackedPlan`) both come from it, so a micro-batch the plan cut fits in the rows collation builds.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for i in range(start, len(lengths)):
        length = lengths[i]
        if length > row_len:
            raise ValueError(f"example {i} has {length} positions, more than row_len={row_len}")
        row = next((r for r, room in enumerate(free) if room >= length), None)
        if row is None:
            if max_rows is not None and len(rows) == max_rows:
                return rows, i
            row = len(rows)
            rows.append([])
            free.append(row_len)
        rows[row].append(i)
        free[row] -= length
    return rows, len(lengths)


def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Which examples share each row: `first_fit` of all of them."""
    return first_fit(lengths, row_len)[0]


def pack_batch(examples: Sequence[TokenizedExample], row_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Several examples per row of exactly `row_len` positions, `position_ids` restarting at 0 for each.

    Targets never cross examples (each example brings its own). Attention stays inside an example only if
    the model builds a block-diagonal mask from `position_ids`: see `lm.losses.forward_logprobs`. A row's
    padded tail is its own block (positions 0, 1, ...) with weight 0.
    """
    for example in examples:
        if len(example) > row_len:
            raise ValueError(f"example {example.index} has {len(example)} positions, more than "
                             f"row_len={row_len}: raise row_len or lower max_length")
    rows = pack_rows([len(example) for example in examples], row_len)
    batch = _empty_batch(len(rows), row_len, pad_id)
    for row, members in enumerate(rows):
        offset = 0
        for i in members:
            _place(batch, row, offset, examples[i])
            offset += len(examples[i])
        batch["position_ids"][row, offset:] = torch.arange(row_len - offset)
    return batch


def _empty_batch(B: int, T: int, pad_id: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.full((B, T), pad_id, dtype=torch.long),
            "target_tokens": torch.full((B, T), pad_id, dtype=torch.long),
            "weights": torch.zeros(B, T, dtype=torch.float32),
            "position_ids": torch.zeros(B, T, dtype=torch.long)}


def _place(batch: dict[str, torch.Tensor], row: int, offset: int, example: TokenizedExample) -> None:
    span = slice(offset, offset + len(example))
    batch["input_ids"][row, span] = example.input_ids
    batch["target_tokens"][row, span] = example.target_tokens
    batch["weights"][row, span] = example.weights
    batch["position_ids"][row, span] = torch.arange(len(example))


# ------------------------------------------------------------------------------------------- display

def show_mask(example: TokenizedExample, tokenizer) -> str:
    """The example's tokens decoded, trained ones inside `[[...]]`: `<bos>2 + 2 =[[ 4<eos>]]`."""
    ids = [*example.input_ids.tolist(), int(example.target_tokens[-1])] if len(example) else []
    trained = [False, *(example.weights > 0).tolist()]  # token 0 is never a target
    pieces, previous = [], ""
    for j in range(len(ids)):
        # Decode growing prefixes so each piece keeps the spacing the decoder puts between tokens.
        text = tokenizer.decode(ids[:j + 1], skip_special_tokens=False)
        pieces.append(text[len(previous):] if text.startswith(previous) else
                      tokenizer.decode(ids[j:j + 1], skip_special_tokens=False))
        previous = text
    out, inside = [], False
    for piece, train in zip(pieces, trained):
        if train != inside:
            out.append("[[" if train else "]]")
            inside = train
        out.append(piece)
    return "".join(out) + ("]]" if inside else "")
