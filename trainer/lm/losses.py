"""The one language-model forward, per-token log-probabilities, and the supervised loss: pure functions.

    scores = forward_logprobs(model, batch)       # batch: lm.data's input_ids/target_tokens/weights/position_ids
    loss = cross_entropy(scores.logprobs, batch)  # mean per trained token; no (tokens x vocabulary) logits made

SFTTrainer and RLTrainer both score tokens with `forward_logprobs`; the policy losses of RL are in
`paperloop.rl`, chosen by name there.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import NamedTuple, Optional

import torch
import torch.utils.checkpoint
from torch.autograd.function import once_differentiable

# Logits made (and turned into float32) at a time: bounds each temporary to CHUNK_ELEMENTS values (64 MiB in
# float32) however large tokens x vocabulary is; at a 152k vocabulary a chunk is 110 rows. Not smaller: on CPU,
# glibc serves blocks under 32 MiB from its heap, and chunks of 8M float32 logits or fewer fragmented it so that
# a forward over 4,096 tokens at vocabulary 32k left RSS 870 MB higher (16M: 56 MB; measured 2026-12-03).
CHUNK_ELEMENTS = 1 << 24


def _chunks(N: int, V: int) -> list[slice]:
    rows = max(1, CHUNK_ELEMENTS // V)
    return [slice(start, start + rows) for start in range(0, N, rows)]


def cross_entropy(logprobs_B_T: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ -logprob · weight / Σ weight over the batch: the weighted mean negative log-likelihood per token.

    The engine scales each micro-batch's mean by its share of the whole step's weight (Σ weights), so the
    step's gradient is the per-token mean over every trained token of the step. A batch with no weight has
    loss 0 (not NaN).
    """
    weights_B_T = batch["weights"].to(logprobs_B_T.dtype)
    return -(logprobs_B_T * weights_B_T).sum() / weights_B_T.sum().clamp_min(torch.finfo(weights_B_T.dtype).tiny)


class TokenScores(NamedTuple):
    """What `forward_logprobs` computes per position: (B, T) each, 0 (False) at the positions it does not score."""

    logprobs: torch.Tensor  # log softmax(logits / temperature)[target], float32 at least; differentiable
    entropy: Optional[torch.Tensor] = None  # entropy of softmax(logits / temperature), when asked
    greedy: Optional[torch.Tensor] = None  # bool: the target is the argmax (what greedy decoding would pick)


def forward_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0, *, entropy: str | None = None,
                     greedy: bool = False, only_trained: bool = True) -> TokenScores:
    """Each target token's log-probability under a transformers causal LM, softmax(logits / temperature), without
    ever holding the (tokens x vocabulary) logits. `model` is the module or a wrapper of it (DDP, peft).
    `entropy`: None, "detached" (a metric, a token filter) or "trained" (an entropy bonus: it carries a gradient);
    `greedy`: also say, per position, whether the target is the argmax.

    The output layer is taken out of the model's forward: a hook on it keeps the final hidden states of the scored
    positions (those with a nonzero weight, or every position with `only_trained=False`) and hands the layer two
    rows only (`checked_rows`), so the model's forward makes (1, 2, V) logits. The output layer and log-softmax then
    run on chunks of at most CHUNK_ELEMENTS logits (`chunked_scores`), each recomputed in the backward instead of
    kept: memory past the last layer is (tokens x hidden) plus one chunk. The rows the model did score are compared with ours once
    per output layer, so a model that post-processes its logits in a way not known here (known: Gemma's final
    soft-capping, Cohere's logit_scale, Granite's logits_scaling) is refused instead of trained on other numbers.

    A model without an output layer to hook, or a compiled one (a hook would break its graph), computes every
    position's logits as it always does; they are scored by the same chunks.

    `use_cache=False` is what keeps packed examples apart: without a cache, transformers reads example
    boundaries from `position_ids` (restarting at 0) and builds a block-diagonal causal mask; with the
    config's default `use_cache=True` it makes a cache, skips that, and packed examples attend to each other.
    No attention mask is passed: padding is only ever at the end of a row or of its own block.
    """
    if entropy not in (None, "detached", "trained"):
        raise ValueError(f"entropy: None, 'detached' or 'trained', got {entropy!r}")
    out = output_hidden(model, batch, only_trained)
    logprobs_N, entropy_N, greedy_N = chunked_scores(out.hidden_N_H, out.targets_N, out.logits_fn, temperature,
                                                     entropy=entropy, greedy=greedy)
    scored_B_T = out.scored_B_T
    return TokenScores(at_positions(logprobs_N, scored_B_T),
                       at_positions(entropy_N, scored_B_T) if entropy_N is not None else None,
                       at_positions(greedy_N, scored_B_T) if greedy_N is not None else None)


class OutputHidden(NamedTuple):
    """What the model's forward leaves for the output layer, at the scored positions (N of them, row-major)."""

    hidden_N_H: torch.Tensor  # final hidden states; or, with `logits_fn` None, the model's own logits (N, V)
    logits_fn: Optional["OutputLogits"]  # hidden (n, H) -> logits (n, V) as the model makes them; None: given
    scored_B_T: torch.Tensor  # bool: the positions scored
    targets_N: torch.Tensor  # their target tokens


def output_hidden(model, batch: dict[str, torch.Tensor], only_trained: bool = True) -> OutputHidden:
    """The model's forward up to its output layer (`forward_logprobs`'s first half, whose docstring says how): the
    final hidden states of the scored positions and the map to their logits, the model's output layer checked
    once; a model whose output layer cannot be hooked gives its logits."""
    kwargs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    scored_B_T = batch["weights"] != 0 if only_trained else torch.ones_like(batch["input_ids"], dtype=torch.bool)
    targets_N = batch["target_tokens"][scored_B_T]
    n_scored, head, calls = len(targets_N), _output_layer(model), []

    def keep_hidden(module, args):
        calls.append(args[0])
        if len(calls) > 1:  # refused below: leave a second call's input (of any shape) alone
            return None
        return (args[0][scored_B_T][None, checked_rows(n_scored)], *args[1:])  # through the model's own path

    handle = head.register_forward_pre_hook(keep_hidden) if head is not None else None
    try:
        logits = model(**kwargs).logits
    finally:
        if handle is not None:
            handle.remove()
    if len(calls) > 1:
        raise RuntimeError(f"{type(model).__name__} calls its output layer {len(calls)} times in one forward; score it "
                           "with a forward of your own (lm.losses.chunked_scores scores hidden states or logits)")
    if not calls:  # no hook: (B, T, V) logits, scored as they are
        return OutputHidden(logits[scored_B_T], None, scored_B_T, targets_N)
    hidden_N_H = calls[0][scored_B_T]
    logits_fn = output_logits_fn(model, head)
    _check_output_layer(model, head, logits_fn, hidden_N_H[checked_rows(n_scored)],
                        logits.reshape(-1, logits.shape[-1]))
    return OutputHidden(hidden_N_H, logits_fn, scored_B_T, targets_N)


def chunked_scores(hidden_N_H: torch.Tensor, targets_N: torch.Tensor, logits_fn=None, temperature: float = 1.0, *,
                   entropy: str | None = None, greedy: bool = False):
    """(logprobs (N,), entropy (N,) or None, greedy (N,) bool or None) of `targets_N` under
    softmax(logits_fn(hidden) / temperature), in chunks of rows holding at most CHUNK_ELEMENTS logits each.
    `logits_fn` None: `hidden_N_H` are the logits themselves.

    Nothing of a chunk's (rows x V) logits is kept for the backward: it recomputes them from the chunk's hidden
    states, so at most one chunk is alive at any time. An output layer that is a plain `nn.Linear` (every
    transformers causal LM's) goes through `_LinearScores`, whose backward is written out and works in place (two
    chunk-sized buffers); any other (a LoRA-wrapped head, say) runs each chunk under non-reentrant activation
    checkpointing, which recomputes it through autograd."""
    N = len(targets_N)
    V = logits_fn.vocabulary if logits_fn is not None else hidden_N_H.shape[-1]
    head = logits_fn.head if logits_fn is not None else None
    linear = head is None or type(head) is torch.nn.Linear
    grad = torch.is_grad_enabled() and (hidden_N_H.requires_grad or any(p.requires_grad for p in _params(head)))
    if linear:
        spec = _Spec.of(logits_fn, temperature, entropy, greedy, hidden_N_H)
        weight, bias = (head.weight, head.bias) if head is not None else (None, None)
    else:
        fn = functools.partial(_score_chunk, logits_fn=logits_fn, temperature=temperature, entropy=entropy,
                               greedy=greedy)
    parts = []
    for rows in _chunks(N, V) or [slice(0, 0)]:  # no position at all: still a result in the graph (a loss of 0)
        hidden_n_H, targets_n = hidden_N_H[rows], targets_N[rows]
        if linear:
            parts.append(_LinearScores.apply(hidden_n_H, weight, bias, targets_n, spec) if grad
                         else _linear_scores(hidden_n_H, weight, bias, targets_n, spec)[:3])
        else:
            parts.append(torch.utils.checkpoint.checkpoint(fn, hidden_n_H, targets_n, use_reentrant=False) if grad
                         else fn(hidden_n_H, targets_n))
    columns = list(zip(*parts))
    logprobs_N = torch.cat(columns[0])
    entropy_N = torch.cat(columns[1]) if entropy else None
    greedy_N = torch.cat(columns[2]) if greedy else None
    return logprobs_N, entropy_N, greedy_N


def _params(module) -> list[torch.Tensor]:
    return list(module.parameters()) if module is not None else []


@dataclasses.dataclass(frozen=True)
class _Spec:
    """How a chunk's logits are made from its hidden states: x = softcap(scale * (h W^T + b)) / temperature,
    the matmul in `dtype` (autocast's, else the weight's), the rest in float32 at least."""

    scale: float
    softcap: float | None
    temperature: float
    dtype: torch.dtype
    entropy: str | None
    greedy: bool

    @staticmethod
    def of(logits_fn, temperature, entropy, greedy, hidden) -> "_Spec":
        device = hidden.device.type
        weight_dtype = logits_fn.head.weight.dtype if logits_fn is not None else hidden.dtype
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) and logits_fn else weight_dtype
        return _Spec(logits_fn.scale if logits_fn else 1.0, logits_fn.softcap if logits_fn else None,
                     float(temperature), dtype, entropy, greedy)


def _chunk_logits(hidden_n_H, weight_V_H, bias_V, spec: _Spec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x (n, V) in float32 at least, tanh(scale * z / softcap) (n, V) or None): the chunk's logits as the
    model's softmax sees them, made in place wherever the dtype allows."""
    if weight_V_H is None:
        z_n_V = hidden_n_H
    else:
        with torch.autocast(hidden_n_H.device.type, enabled=False):  # the casts are explicit: the backward repeats them
            z_n_V = torch.nn.functional.linear(hidden_n_H.to(spec.dtype), weight_V_H.to(spec.dtype),
                                               bias_V.to(spec.dtype) if bias_V is not None else None)
    x_n_V = z_n_V.to(torch.promote_types(z_n_V.dtype, torch.float32), copy=weight_V_H is None)
    if spec.softcap:
        tanh_n_V = x_n_V.mul_(spec.scale / spec.softcap).tanh_()
        return tanh_n_V * (spec.softcap / spec.temperature), tanh_n_V
    if spec.scale / spec.temperature != 1.0:
        x_n_V.mul_(spec.scale / spec.temperature)
    return x_n_V, None


def _linear_scores(hidden_n_H, weight_V_H, bias_V, targets_n, spec: _Spec):
    """(logprobs (n,), entropy (n,) or empty, greedy (n,) or empty, log-normalizer (n,)) of one chunk."""
    x_n_V, _ = _chunk_logits(hidden_n_H, weight_V_H, bias_V, spec)
    logprobs_n_V = torch.log_softmax(x_n_V, dim=-1)
    logprobs_n = logprobs_n_V.gather(1, targets_n[:, None]).squeeze(1)
    lse_n = x_n_V.gather(1, targets_n[:, None]).squeeze(1) - logprobs_n
    del x_n_V
    empty = logprobs_n.new_zeros(0)
    greedy_n = logprobs_n_V.argmax(-1) == targets_n if spec.greedy else empty.bool()
    entropy_n = -logprobs_n_V.exp().mul_(logprobs_n_V).sum(-1) if spec.entropy else empty
    return logprobs_n, entropy_n, greedy_n, lse_n


class _LinearScores(torch.autograd.Function):
    """One chunk's scores through a linear output layer; the backward recomputes the chunk's logits and writes
    d(logprob, entropy)/d logits out: g_lp (onehot - p) - g_H p (log p + H), times the chain of the scale,
    soft-cap and temperature, then into the hidden states, the weight and the bias by two matmuls."""

    @staticmethod
    def forward(ctx, hidden_n_H, weight_V_H, bias_V, targets_n, spec):
        logprobs_n, entropy_n, greedy_n, lse_n = _linear_scores(hidden_n_H, weight_V_H, bias_V, targets_n, spec)
        ctx.spec = spec
        ctx.save_for_backward(hidden_n_H, weight_V_H, bias_V, targets_n, lse_n,
                              entropy_n if spec.entropy == "trained" else None)
        ctx.mark_non_differentiable(greedy_n, *([entropy_n] if spec.entropy != "trained" else []))
        return logprobs_n, entropy_n, greedy_n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs_n, grad_entropy_n, _):
        hidden_n_H, weight_V_H, bias_V, targets_n, lse_n, entropy_n = ctx.saved_tensors
        spec = ctx.spec
        x_n_V, tanh_n_V = _chunk_logits(hidden_n_H, weight_V_H, bias_V, spec)
        logp_n_V = x_n_V.sub_(lse_n[:, None])
        g_lp_n = grad_logprobs_n.to(logp_n_V.dtype) if grad_logprobs_n is not None else lse_n.new_zeros(lse_n.shape)
        p_n_V = logp_n_V.exp()
        if entropy_n is not None and grad_entropy_n is not None:  # -(g_lp + g_H (log p + H)) p, in logp's buffer
            g_H_n = grad_entropy_n.to(logp_n_V.dtype)
            g_n_V = logp_n_V.add_(entropy_n[:, None]).mul_(g_H_n[:, None]).add_(g_lp_n[:, None]).mul_(p_n_V).neg_()
            del p_n_V
        else:
            del logp_n_V
            g_n_V = p_n_V.mul_(-g_lp_n[:, None])
        g_n_V.scatter_add_(1, targets_n[:, None], g_lp_n[:, None])
        if tanh_n_V is not None:  # d/dz softcap(scale z) / T = scale (1 - tanh^2) / T
            g_n_V.mul_(tanh_n_V.square_().neg_().add_(1))
        if spec.scale / spec.temperature != 1.0:
            g_n_V.mul_(spec.scale / spec.temperature)
        if weight_V_H is None:
            return g_n_V.to(hidden_n_H.dtype), None, None, None, None
        g_n_V = g_n_V.to(spec.dtype)
        grad_hidden = (g_n_V @ weight_V_H.to(spec.dtype)).to(hidden_n_H.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (g_n_V.T @ hidden_n_H.to(spec.dtype)).to(weight_V_H.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = g_n_V.sum(0).to(bias_V.dtype) if bias_V is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None


def _score_chunk(hidden_n_H, targets_n, *, logits_fn, temperature, entropy, greedy):
    """One chunk through any output layer (autograd does the backward): the path of heads that are not a plain
    nn.Linear."""
    logits_n_V = logits_fn(hidden_n_H)
    logits_n_V = logits_n_V.to(torch.promote_types(logits_n_V.dtype, torch.float32))
    if temperature != 1.0:
        logits_n_V = logits_n_V / temperature
    logprobs_n_V = torch.log_softmax(logits_n_V, dim=-1)
    logprobs_n = logprobs_n_V.gather(1, targets_n[:, None]).squeeze(1)
    entropy_n = greedy_n = None
    if entropy:
        p_logp_n_V = logprobs_n_V if entropy == "trained" else logprobs_n_V.detach()
        entropy_n = -(p_logp_n_V.exp() * p_logp_n_V).sum(dim=-1)
    if greedy:
        greedy_n = logits_n_V.detach().argmax(-1) == targets_n
    return logprobs_n, entropy_n, greedy_n


class OutputLogits:
    """hidden (n, H) -> logits (n, V) as the model makes them: its output layer, then the post-processing of the
    logits that some families do in their forward (soft-capping, a scale)."""

    def __init__(self, head: torch.nn.Module, vocabulary: int, scale: float = 1.0, softcap: float | None = None):
        self.head, self.vocabulary, self.scale, self.softcap = head, vocabulary, scale, softcap

    def __call__(self, hidden_n_H: torch.Tensor) -> torch.Tensor:
        logits_n_V = self.head(hidden_n_H)
        if self.scale != 1.0:
            logits_n_V = logits_n_V * self.scale
        if self.softcap:  # Gemma 2/3: cap * tanh(logits / cap), in float32 (at least) as they do
            logits_n_V = logits_n_V.to(torch.promote_types(logits_n_V.dtype, torch.float32))
            logits_n_V = torch.tanh(logits_n_V / self.softcap) * self.softcap
        return logits_n_V


def output_logits_fn(model, head: torch.nn.Module) -> OutputLogits:
    """The model's hidden -> logits map, from its config: Gemma's `final_logit_softcapping`, Cohere's
    `logit_scale` (a multiplier), Granite's `logits_scaling` (a divisor)."""
    inner = _transformers_model(model)
    config = getattr(inner, "config", None)
    scale = float(getattr(inner, "logit_scale", None) or 1.0)  # Cohere keeps it on the model
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    vocabulary = getattr(head, "out_features", None) or getattr(config, "vocab_size", None)
    if vocabulary is None:
        weight = getattr(head, "weight", None)
        vocabulary = weight.shape[0] if weight is not None else None
    if vocabulary is None:
        raise RuntimeError(f"{type(inner).__name__}: its output layer ({type(head).__name__}) has no out_features or "
                           "weight, and its config no vocab_size: the vocabulary size to chunk by is unknown")
    return OutputLogits(head, int(vocabulary), scale, getattr(config, "final_logit_softcapping", None))


_CHECKED_HEADS: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def checked_rows(n: int) -> list[int]:
    """The scored positions the model's own output layer gets, to check our logits by: the first and the last (a
    forward that post-processes positions after the first is caught); no more, so no (tokens x vocabulary)
    tensor is ever made."""
    return sorted({0, n - 1}) if n else []


def _check_output_layer(model, head, logits_fn: OutputLogits, hidden_K_H, model_logits_K_V) -> None:
    """Once per output layer: our logits of the rows the model scored itself must be the model's, to within a few
    units in the last place of their dtype (the same operations on the same rows, in other batch shapes): a
    post-processing not known here, even a scale of 1.009, changes them by far more."""
    if head in _CHECKED_HEADS or len(hidden_K_H) == 0:
        return
    with torch.no_grad():
        ours_K_V = logits_fn(hidden_K_H.detach()).double()
        theirs_K_V = model_logits_K_V.detach().double()
    tolerance = 4 * torch.finfo(model_logits_K_V.dtype).eps
    if ours_K_V.shape != theirs_K_V.shape or not torch.allclose(
            ours_K_V, theirs_K_V, rtol=tolerance, atol=tolerance * float(theirs_K_V.abs().max())):
        gap = (ours_K_V - theirs_K_V).abs().max().item() if ours_K_V.shape == theirs_K_V.shape else float("nan")
        raise RuntimeError(
            f"{type(_transformers_model(model)).__name__}: its forward changes the output layer's logits in a way "
            f"the chunked scoring does not know (largest gap {gap:.3g} over {len(hidden_K_H)} rows; known: "
            "final_logit_softcapping, logit_scale, logits_scaling), so the log-probs would not be the model's. Score "
            "it with a forward of your own, or tell us which post-processing it does")
    _CHECKED_HEADS.add(head)


def at_positions(values_N: torch.Tensor, trained_B_T: torch.Tensor) -> torch.Tensor:
    """Values of the trained positions (N,), in row-major order, back in their (B, T) places; 0 elsewhere.
    Differentiable in `values_N`."""
    return values_N.new_zeros(trained_B_T.shape).masked_scatter(trained_B_T, values_N)


def _output_layer(model) -> torch.nn.Module | None:
    """The module that turns final hidden states into logits (a transformers model's `get_output_embeddings()`),
    through DDP and peft wrappers; None for a compiled model or one without it."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return None
    inner = getattr(model, "module", model)  # DistributedDataParallel
    get = getattr(inner, "get_output_embeddings", None)
    return get() if callable(get) else None


def _transformers_model(model) -> torch.nn.Module:
    """The transformers model under DDP and peft wrappers."""
    inner = getattr(model, "module", model)
    get_base = getattr(inner, "get_base_model", None)  # peft
    return get_base() if callable(get_base) else inner
