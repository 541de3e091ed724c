"""Sample completions from a causal LM with a KV cache, drawing only from a `torch.Generator` the caller owns.

    from paperloop.lm.sampling import sample

    generator = torch.Generator().manual_seed(0)          # the trainer owns it and checkpoints its state
    samples = sample(model, [[5, 6, 7], [8, 9]], num_samples=4, max_new_tokens=16, generator=generator,
                     temperature=1.0, top_p=1.0, eos_token_id=2, pad_token_id=0)
    samples.tokens_N_L, samples.logprobs_N_L, samples.lengths_N   # rows grouped: prompt i is rows i*G .. i*G+G-1

Why not `model.generate`: it samples from the global torch RNG and takes no generator, so a run resumed from a
checkpoint could not draw the same completions as the uninterrupted run. Here every random number comes from
`generator`, the global RNG is never touched, and the same generator state gives the same samples.

One decode loop, `TurnSampler`, serves a single completion and a multi-turn episode alike (`sample` is its one
turn): left-pad the prompts (attention mask and explicit position ids), prefill each distinct prompt once and
repeat its KV cache for its rows (cheaper than prefilling G copies; see `benchmarks/sampling.py`), then one token
per step for all rows until every row has emitted a stop token or `max_new_tokens` is reached. Rows that have
finished keep running with padding (dropping them would reallocate the cache for little gain at RL lengths) and
are masked out. A sharded (FSDP) model's processes stop together (`finished_everywhere`): its forward is a
collective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .weights import is_peft
from ..distributed import is_sharded
from .data import ChatTemplateTimeout, render_chat

log = logging.getLogger(__name__)

__all__ = ["Samples", "sample", "TurnSampler", "default_stop_token_ids", "draw", "top_p_filter", "left_pad",
           "GrowingLayer", "growing_cache", "cache_argument"]

# How often (in tokens) the loop asks whether every row has finished: on an accelerator the check is a host sync.
FINISHED_CHECK_EVERY = 4


@dataclass(frozen=True)
class Samples:
    """Completions for N = len(prompts) * group_size rows; prompt i's samples are rows i*G .. i*G+G-1.

    tokens_N_L: completion ids through and including EOS where a row stopped there, right-padded with the pad id.
    logprobs_N_L: log-prob of each chosen token under the temperature-scaled distribution, log softmax(logits / T),
        taken before top-p truncation (see `sample`); 0 on padding.
    lengths_N: number of completion tokens per row (EOS included).
    stopped_N: True where the row ended with EOS, False where it ran out of `max_new_tokens`.
    """

    tokens_N_L: torch.Tensor
    logprobs_N_L: torch.Tensor
    lengths_N: torch.Tensor
    stopped_N: torch.Tensor
    group_size: int

    def __len__(self) -> int:
        return self.tokens_N_L.shape[0]

    def completions(self) -> list[list[int]]:
        """Each row's completion ids as a python list (one host transfer for the whole batch)."""
        return [row[:n] for row, n in zip(self.tokens_N_L.tolist(), self.lengths_N.tolist())]


def sample(model, prompts: list[list[int]], num_samples: int, max_new_tokens: int, *, generator: torch.Generator,
           temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | Sequence[int],
           pad_token_id: int) -> Samples:
    """Draw `num_samples` completions for each prompt (lists of token ids) from `model`, a transformers causal LM:
    one turn of a `TurnSampler` whose rows are each prompt repeated `num_samples` times (prefilled once).

    temperature > 0 samples from softmax(logits / temperature), truncated to the smallest set of tokens whose
    probability reaches `top_p` (nucleus sampling) when top_p < 1; temperature == 0 is greedy (argmax).

    The log-probs returned are those of the chosen tokens under log softmax(logits / temperature) — the
    temperature-scaled distribution *before* top-p truncation. That is the distribution a training forward
    computes (it scales by the temperature and truncates nothing), so these numbers are the behaviour policy's
    log-probs in the same terms as the policy being optimized; the truncated distribution would differ from it by
    the log of the kept mass on every token and is not differentiable in which tokens are kept. Greedy decoding
    has no sampling distribution (the limit is log 1 = 0), so it returns log softmax(logits), the untempered
    model's log-probs, useful for scoring evaluations.

    Runs under inference mode with the model in eval mode (each module's training flag is restored afterwards)
    and a fresh KV cache, whatever `model.config.use_cache` says. Only `generator` is drawn from; it must live on
    the model's device. Pass the unwrapped model (not a DDP wrapper): sampling needs no gradient synchronization.
    """
    _check_sample_args(prompts, num_samples, max_new_tokens, temperature, top_p, eos_token_id, pad_token_id)
    rows = [prompt for prompt in prompts for _ in range(num_samples)]
    samples = TurnSampler(model, rows, generator=generator, temperature=temperature, top_p=top_p,
                          eos_token_id=eos_token_id, pad_token_id=pad_token_id).sample(max_new_tokens)
    return dataclasses.replace(samples, group_size=num_samples)


def _check_device(model, generator: torch.Generator) -> torch.device:
    device = next(model.parameters()).device
    if generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, the model on {device}: they must match")
    return device


@contextlib.contextmanager
def _inference(model):
    """Inference mode with `model` in eval mode; each module's training flag is restored afterwards."""
    # eval() walks every module: skip it (and the restore) for a model already in eval mode
    modes = {module: module.training for module in model.modules()} if model.training else {}
    model.eval()
    try:
        # FSDP allocates its unsharded weights inside the forward: made in inference mode, they could not be
        # written again by the training forward after it
        with torch.no_grad() if is_sharded(model) else torch.inference_mode():
            yield
    finally:
        for module, training in modes.items():
            module.training = training


def finished_everywhere(model, finished_N: torch.Tensor) -> bool:
    """Has every row stopped, on every process that samples with `model`? A sharded (FSDP) model's forward is
    a collective, so its processes stop together, when the last of them is done; any other model samples on its
    own process."""
    done = bool(finished_N.all())
    if not is_sharded(model):
        return done
    flag = torch.tensor(float(done), device=finished_N.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag)


class TurnSampler:
    """Sampling over several turns for a batch of rows, each turn continuing the rows' KV cache: a multi-turn
    episode's transcript is prefilled once, token by token as it grows, never again from its start.

        sampler = TurnSampler(model, first_ids_N, generator=generator, temperature=1.0, top_p=1.0,
                              eos_token_id=stop_ids, pad_token_id=pad)
        turn = sampler.sample(max_new_tokens)      # the live rows' next actions (a Samples, group size 1)
        sampler.keep(rows)                         # rows (indices into first_ids_N) that go on; the others end
        sampler.extend(observation_ids_R)          # each kept row's observation, prefilled onto its cache

    `sample` draws exactly as `sample` does (the same generator use, log-probs and stop rule), so a row's first
    turn is the single-turn completion. The rows share one cache of one width: where a row is padding (a row that
    stopped while others went on, a shorter observation), its columns are masked out, and explicit position ids
    count only its real tokens. A row's last sampled token is not fed until its observation is (one forward a turn
    saved). Rows whose first observations are equal (a group's episodes often start alike) are prefilled once.

    A model with sliding-window attention layers (Mistral, Gemma 2/3, gpt-oss: transformers gives their cache
    `is_sliding` layers) cannot be continued so: the window counts cache columns, and the masked columns between a
    row's turns would push its own tokens out of it (log-probs off a full forward's by up to 0.16 nats, or NaN
    where a window holds only masked columns). For such a model `extend` prefills each live row's whole transcript
    afresh, left-padded so that its tokens are contiguous columns: slower, and the same numbers a training forward
    computes.
    """

    def __init__(self, model, prompts: list[list[int]], *, generator: torch.Generator, temperature: float = 1.0,
                 top_p: float = 1.0, eos_token_id: int | Sequence[int], pad_token_id: int):
        eos_ids = _check_sample_args(prompts, 1, 1, temperature, top_p, eos_token_id, pad_token_id)
        self.model, self.generator, self.temperature, self.top_p = model, generator, temperature, top_p
        self.device = _check_device(model, generator)
        self.eos_E, self.pad_id = torch.tensor(eos_ids, device=self.device), pad_token_id
        self.rows = list(range(len(prompts)))  # the live rows, as indices into `prompts`, in the cache's order
        self._prefill(prompts)
        self.windowed = any(getattr(layer, "is_sliding", False) for layer in self.cache.layers)
        # a windowed model's live rows' transcripts so far, to prefill again each turn
        self.transcripts_R = [list(prompt) for prompt in prompts] if self.windowed else None

    def _prefill(self, prompts_R: list[list[int]]) -> None:
        """A fresh cache holding `prompts_R` (one per live row), each distinct one prefilled once."""
        self.cache = growing_cache(self.model.config)
        self.cache_arg = {cache_argument(self.model): self.cache}
        unique = {tuple(p): i for i, p in reversed(list(enumerate(prompts_R)))}  # first row of each distinct prompt
        firsts = sorted(unique.values())
        ids_U_S, attention_U_S = left_pad([prompts_R[i] for i in firsts], self.pad_id, self.device)
        with _inference(self.model):
            logits_U_V = self.model(input_ids=ids_U_S, attention_mask=attention_U_S,
                                    position_ids=(attention_U_S.cumsum(dim=1) - 1).clamp(min=0), **self.cache_arg,
                                    use_cache=True, logits_to_keep=1).logits[:, -1]
            where_R = torch.tensor([firsts.index(unique[tuple(p)]) for p in prompts_R], device=self.device)
            if len(firsts) < len(prompts_R):
                self.cache.batch_select_indices(where_R)
            self.logits_R_V = logits_U_V[where_R]  # each row's next-token logits
            self.attention_R_S = attention_U_S[where_R]  # 1 where a cache column is the row's real token
        self.next_position_R = self.attention_R_S.sum(dim=1)
        self.pending_R = torch.full((len(prompts_R),), self.pad_id, device=self.device)  # last drawn, not yet fed
        self.pending_valid_R = torch.zeros(len(prompts_R), dtype=torch.bool, device=self.device)

    def sample(self, max_new_tokens: int) -> Samples:
        """Each live row's next action: up to `max_new_tokens` tokens, ending at a stop token."""
        if not self.rows:
            raise ValueError("TurnSampler.sample: every row has ended")
        R, L = len(self.rows), max_new_tokens
        with _inference(self.model):
            tokens_R_L = torch.full((R, L), self.pad_id, dtype=torch.long, device=self.device)
            logprobs_R_L = torch.zeros(R, L, dtype=_score_dtype(self.logits_R_V), device=self.device)
            lengths_R = torch.zeros(R, dtype=torch.long, device=self.device)
            finished_R = torch.zeros(R, dtype=torch.bool, device=self.device)
            for t in range(L):
                token_R, logprob_R = draw(self.logits_R_V, self.generator, self.temperature, self.top_p)
                live_R = ~finished_R
                tokens_R_L[:, t] = token_R.masked_fill(finished_R, self.pad_id)
                logprobs_R_L[:, t] = logprob_R.masked_fill(finished_R, 0.0)
                lengths_R += live_R
                finished_R = finished_R | torch.isin(token_R, self.eos_E)
                if t + 1 == L or ((t + 1) % FINISHED_CHECK_EVERY == 0
                                  and finished_everywhere(self.model, finished_R)):
                    self.pending_R, self.pending_valid_R = tokens_R_L[:, t].clone(), live_R
                    break
                self._feed(tokens_R_L[:, t:t + 1], live_R[:, None])
            width = int(lengths_R.max())
            raw = tokens_R_L[:, :width], logprobs_R_L[:, :width], lengths_R, finished_R
        samples = Samples(*(tensor.clone(memory_format=torch.contiguous_format) for tensor in raw), group_size=1)
        if self.windowed:
            for transcript, completion in zip(self.transcripts_R, samples.completions()):
                transcript += completion
        return samples

    def keep(self, rows: list[int]) -> None:
        """Only `rows` (a subset of the live rows, in their order) go on; the others' cache is freed."""
        at = {row: i for i, row in enumerate(self.rows)}
        if any(row not in at for row in rows) or sorted(rows, key=at.get) != list(rows):
            raise ValueError(f"TurnSampler.keep: {rows!r:.80} is not a subsequence of the live rows")
        if len(rows) == len(self.rows):
            return
        index_K = torch.tensor([at[row] for row in rows], dtype=torch.long, device=self.device)
        self.rows = list(rows)
        if self.windowed:
            self.transcripts_R = [self.transcripts_R[at[row]] for row in rows]
        if rows:
            self.cache.batch_select_indices(index_K)
        for name in ("logits_R_V", "attention_R_S", "next_position_R", "pending_R", "pending_valid_R"):
            setattr(self, name, getattr(self, name)[index_K])

    def extend(self, observations_R: list[list[int]]) -> None:
        """Append each live row's observation (token ids, possibly none) after its last action, in one forward."""
        if len(observations_R) != len(self.rows):
            raise ValueError(f"TurnSampler.extend: {len(observations_R)} observations for {len(self.rows)} live rows")
        if self.windowed:  # the whole transcripts again, contiguous (see the class docstring)
            self.transcripts_R = [transcript + list(ids) for transcript, ids in zip(self.transcripts_R, observations_R)]
            return self._prefill(self.transcripts_R)
        pending = self.pending_R.tolist()
        blocks = [[pending[r]] * bool(valid) + list(ids)
                  for r, (valid, ids) in enumerate(zip(self.pending_valid_R.tolist(), observations_R))]
        self.pending_valid_R = torch.zeros_like(self.pending_valid_R)
        if not any(blocks):
            return
        # left-padded inside the block, so that every row's last real token is the block's last column
        ids_R_W, valid_R_W = left_pad([block or [self.pad_id] for block in blocks], self.pad_id, self.device)
        valid_R_W[[r for r, block in enumerate(blocks) if not block]] = 0
        with _inference(self.model):
            self._feed(ids_R_W, valid_R_W.bool())

    def _feed(self, ids_R_W: torch.Tensor, valid_R_W: torch.Tensor) -> None:
        """Prefill a block of columns onto the cache; a row's logits move on only if the block holds a real token
        (a row that stopped early keeps the logits after its stop token, for an observation of no tokens)."""
        attention_R_S = torch.cat([self.attention_R_S, valid_R_W.to(self.attention_R_S.dtype)], dim=1)
        positions_R_W = self.next_position_R[:, None] + valid_R_W.long().cumsum(dim=1) - 1
        logits_R_V = self.model(input_ids=ids_R_W, attention_mask=attention_R_S, position_ids=positions_R_W.clamp(min=0),
                                **self.cache_arg, use_cache=True, logits_to_keep=1).logits[:, -1]
        self.logits_R_V = torch.where(valid_R_W.any(dim=1)[:, None], logits_R_V, self.logits_R_V)
        self.attention_R_S, self.next_position_R = attention_R_S, self.next_position_R + valid_R_W.sum(dim=1)


def cache_argument(model) -> str:
    """The name under which `model`'s forward takes a KV cache: `cache` (transformers 5.24 on; `past_key_values`
    is deprecated there and goes in 5.40) or `past_key_values` (earlier releases).

    Asked of the transformers model itself, under peft, `torch.compile` and DDP wrappers (whose forwards pass
    keywords through); a forward that names neither (another wrapper's `**kwargs`) gets the installed
    transformers' name, as its Llama takes it.
    """
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif is_peft(model):
            model = model.get_base_model()
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            break
    parameters = inspect.signature(model.forward).parameters
    if "cache" not in parameters and "past_key_values" not in parameters:
        from transformers import LlamaForCausalLM
        parameters = inspect.signature(LlamaForCausalLM.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` that appends into spare capacity instead of `torch.cat`-ing the whole cache every token.

    `DynamicLayer.update` copies all cached keys and values at each step (O(T²) copying over a generation, ~10% of
    the sampling time of a tiny model here). This layer keeps storage with room to spare, doubling it when full,
    and exposes the filled prefix as `keys`/`values` views, so every other cache method works unchanged. Methods
    that replace `keys` with new tensors (`batch_repeat_interleave`, `batch_select_indices`, `reorder_cache`) are
    noticed at the next update, which copies them into fresh storage; `crop` leaves a shorter view of the same
    storage, and the next update writes after it.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._storage = None  # (keys, values) with room along the sequence dimension, or None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self.get_seq_length() == 0:
            self._storage = None
            return super().update(key_states, value_states, *args, **kwargs)
        length, new = self.keys.shape[-2], key_states.shape[-2]
        stale = self._storage is None or self.keys.data_ptr() != self._storage[0].data_ptr() \
            or self.keys.shape[:-2] != self._storage[0].shape[:-2]
        if stale or length + new > self._storage[0].shape[-2]:
            self._storage = tuple(self._reserve(cached, 2 * (length + new)) for cached in (self.keys, self.values))
        keys, values = self._storage
        keys[..., length:length + new, :] = key_states
        values[..., length:length + new, :] = value_states
        self.keys, self.values = keys[..., :length + new, :], values[..., :length + new, :]
        return self.keys, self.values

    @staticmethod
    def _reserve(cached: torch.Tensor, capacity: int) -> torch.Tensor:
        storage = cached.new_empty(*cached.shape[:-2], capacity, cached.shape[-1])
        storage[..., :cached.shape[-2], :] = cached
        return storage


def growing_cache(config) -> DynamicCache:
    """`DynamicCache(config=config)` with its plain full-attention layers replaced by `GrowingLayer`s; sliding-window
    and other special layers are kept as transformers builds them."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    if cache.layer_class_to_replicate is DynamicLayer:  # layers created lazily
        cache.layer_class_to_replicate = GrowingLayer
    return cache


def default_stop_token_ids(tokenizer, model) -> list[int]:
    """Generation stops at EOS (the tokenizer's and the model's generation config's) and, for a chat template,
    at the token it writes right after an assistant's content (the end-of-turn marker, e.g. `<|end|>`), found by
    rendering a probe conversation. A template that ignores `add_generation_prompt` (it writes no assistant
    header for generation) is warned about: its end-of-turn marker is still found and stops generation."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    if tokenizer.chat_template is not None:
        ids.update(_end_of_turn(tokenizer))
    ids = sorted(i for i in ids if i is not None)
    if not ids:
        raise ValueError("the tokenizer has no eos_token and the model's generation config names none: generation "
                         "could not stop; give the tokenizer an eos_token (SFTTrainer and RLTrainer also take "
                         "stop_token_ids=[...])")
    return ids


PROBE = "Zq7xK"  # an assistant content that no template writes by itself


def _end_of_turn(tokenizer) -> list[int]:
    """The first token the chat template writes after an assistant's content, or none when it writes nothing or
    the probe conversation is one the template refuses (then EOS alone stops)."""
    user = [{"role": "user", "content": "q"}]
    try:
        through = render_chat(tokenizer, [*user, {"role": "assistant", "content": PROBE}], False, "stop-token probe")
        with_prompt = render_chat(tokenizer, user, True, "stop-token probe")
        without = render_chat(tokenizer, user, False, "stop-token probe")
    except ChatTemplateTimeout:
        raise
    except ValueError:  # a template that needs other roles or fields
        return []
    if with_prompt == without:
        log.warning("the chat template ignores add_generation_prompt: a prompt rendered for generation ends without "
                    "the assistant's header, so the model writes it; generation stops at the template's end-of-turn "
                    "marker all the same (pass stop_token_ids=[...] to choose)")
    end = through.rfind(PROBE)
    after = through[end + len(PROBE):] if end >= 0 else ""
    return tokenizer(after, add_special_tokens=False)["input_ids"][:1] if after else []


def draw(logits_N_V: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
         top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from logits (N, V): (token_N, logprob_N), with the log-probs described in `sample`."""
    if temperature == 0:
        logprobs_N_V = torch.log_softmax(logits_N_V.to(_score_dtype(logits_N_V)), dim=-1)
        token_N = logprobs_N_V.argmax(dim=-1)
    else:
        logprobs_N_V = torch.log_softmax(logits_N_V.to(_score_dtype(logits_N_V)) / temperature, dim=-1)
        probs_N_V = logprobs_N_V.exp()
        if top_p < 1.0:
            probs_N_V = top_p_filter(probs_N_V, top_p)
        token_N = torch.multinomial(probs_N_V, 1, generator=generator).squeeze(1)
    return token_N, logprobs_N_V.gather(1, token_N[:, None]).squeeze(1)


def _score_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def top_p_filter(probs_N_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest most-probable set whose mass reaches `top_p` (Holtzman et al. 2020).

    The most probable token is always kept. The result is unnormalized; `torch.multinomial` normalizes.
    """
    sorted_N_V, order_N_V = probs_N_V.sort(dim=-1, descending=True)
    mass_before_N_V = sorted_N_V.cumsum(dim=-1) - sorted_N_V  # mass of the strictly more probable tokens
    sorted_N_V = sorted_N_V.masked_fill(mass_before_N_V >= top_p, 0.0)
    return torch.zeros_like(probs_N_V).scatter_(-1, order_N_V, sorted_N_V)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as (P, S) ids and a (P, S) attention mask, padded on the left so that every
    row's next token goes in the same column."""
    width = max(len(p) for p in prompts)
    ids_P_S = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_P_S = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids_P_S[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_P_S[i, width - len(prompt):] = 1
    return ids_P_S.to(device), attention_P_S.to(device)


def _check_sample_args(prompts, num_samples, max_new_tokens, temperature, top_p, eos_token_id,
                       pad_token_id) -> list[int]:
    def is_int(x):
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    def is_real(x):
        return isinstance(x, numbers.Real) and not isinstance(x, bool)

    if not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or len(prompt) == 0 \
                or not all(is_int(tok) and tok >= 0 for tok in prompt):
            raise ValueError(f"prompts[{i}] must be a non-empty list of non-negative token ids, got {prompt!r:.80}")
    if not is_int(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not is_real(temperature) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not is_real(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    eos_ids = [eos_token_id] if is_int(eos_token_id) else eos_token_id
    if not isinstance(eos_ids, Sequence) or isinstance(eos_ids, (str, bytes)) or not eos_ids \
            or not all(is_int(tok) and tok >= 0 for tok in eos_ids):
        raise ValueError(f"eos_token_id must be a token id or a non-empty list of them, got {eos_token_id!r}")
    if not is_int(pad_token_id) or pad_token_id < 0:
        raise ValueError(f"pad_token_id must be a non-negative token id, got {pad_token_id!r}")
    return [int(tok) for tok in eos_ids]
