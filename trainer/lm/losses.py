"""The one language-model forward, per-token log-probabilities, and the supervised loss: pure functions.

    logprobs_B_T, logits_B_T_V = forward_logprobs(model, batch)   # batch: lm.data's input_ids/target_tokens/
    loss = cross_entropy(logprobs_B_T, batch)                     #   weights/position_ids; mean per trained token

SFTTrainer and RLTrainer both score tokens with `forward_logprobs`; the policy losses of RL are in
`paperloop.rl`, chosen by name there.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# Rows of logits turned into float32 at a time: bounds the temporary float32 copy to CHUNK_ELEMENTS values
# (64 MiB) however large B * T * V is.
CHUNK_ELEMENTS = 1 << 24


def token_logprobs(logits_B_T_V: torch.Tensor, target_tokens_B_T: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position, in float32 for half-precision logits. (B, T)

    Memory: for backward it keeps only the logits themselves and a (B, T) log-normalizer, recomputing the
    softmax there, and it converts at most CHUNK_ELEMENTS logits to float32 at a time. A plain
    `log_softmax(logits.float())` keeps a (B, T, V) float32 result for backward beside the logits, and for
    half-precision logits makes a second float32 copy while converting.
    """
    return _TokenLogprobs.apply(logits_B_T_V, target_tokens_B_T)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_B_T_V, target_tokens_B_T):
        V = logits_B_T_V.shape[-1]
        logits_N_V, targets_N = logits_B_T_V.reshape(-1, V), target_tokens_B_T.reshape(-1)
        dtype = torch.promote_types(logits_B_T_V.dtype, torch.float32)  # float64 stays float64
        logprobs_N = torch.empty(targets_N.shape, dtype=dtype, device=logits_B_T_V.device)
        lse_N = torch.empty_like(logprobs_N)
        for rows in _chunks(len(targets_N), V):
            x_n_V = logits_N_V[rows].to(dtype)
            # log_softmax, then the normalizer from it: one vectorized pass (logsumexp is slower on CPU, ~1.35x)
            targets_n_1 = targets_N[rows, None]
            logprobs_N[rows] = torch.log_softmax(x_n_V, dim=-1).gather(1, targets_n_1).squeeze(1)
            lse_N[rows] = x_n_V.gather(1, targets_n_1).squeeze(1) - logprobs_N[rows]
        ctx.save_for_backward(logits_B_T_V, target_tokens_B_T, lse_N)
        return logprobs_N.view(target_tokens_B_T.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_B_T):
        logits_B_T_V, target_tokens_B_T, lse_N = ctx.saved_tensors
        V = logits_B_T_V.shape[-1]
        logits_N_V, targets_N = logits_B_T_V.reshape(-1, V), target_tokens_B_T.reshape(-1)
        grad_N = grad_B_T.reshape(-1).to(lse_N.dtype)
        same_dtype = logits_N_V.dtype == lse_N.dtype
        grad_N_V = torch.empty_like(logits_N_V)
        for rows in _chunks(len(targets_N), V):
            # d logprob / d logits = onehot(target) - softmax(logits), scaled by the incoming gradient. Written
            # straight into the gradient's rows when the dtypes agree: a separate chunk and a copy of it cost
            # 4x the arithmetic here (page faults of a fresh buffer per step).
            g_n_V = grad_N_V[rows] if same_dtype else torch.empty(grad_N_V[rows].shape, dtype=lse_N.dtype,
                                                                  device=grad_N_V.device)
            torch.sub(logits_N_V[rows].to(lse_N.dtype), lse_N[rows, None], out=g_n_V)
            g_n_V.exp_().mul_(-grad_N[rows, None])
            g_n_V.scatter_add_(1, targets_N[rows, None], grad_N[rows, None])
            if not same_dtype:
                grad_N_V[rows] = g_n_V
        return grad_N_V.view(logits_B_T_V.shape), None


def token_entropy(logits_B_T_V: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) at each position, (B, T) in float32 (at least), without gradient. Converts at
    most CHUNK_ELEMENTS logits to float32 at a time, like `token_logprobs`."""
    V = logits_B_T_V.shape[-1]
    logits_N_V = logits_B_T_V.detach().reshape(-1, V)
    dtype = torch.promote_types(logits_N_V.dtype, torch.float32)
    entropy_N = torch.empty(logits_N_V.shape[0], dtype=dtype, device=logits_N_V.device)
    for rows in _chunks(len(logits_N_V), V):
        logprobs_n_V = torch.log_softmax(logits_N_V[rows].to(dtype), dim=-1)
        entropy_N[rows] = -(logprobs_n_V.exp() * logprobs_n_V).sum(dim=-1)
    return entropy_N.view(logits_B_T_V.shape[:-1])


def entropy(logits_N_V: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per row, (N,) in float32 at least, differentiable (an entropy bonus trains it).
    Keeps an (N, V) float32 copy for backward: use `token_entropy` where no gradient is needed."""
    logprobs_N_V = torch.log_softmax(logits_N_V.to(torch.promote_types(logits_N_V.dtype, torch.float32)), dim=-1)
    return -(logprobs_N_V.exp() * logprobs_N_V).sum(dim=-1)


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


def forward_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0, only_trained: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target token's log-probability under a transformers causal LM, softmax(logits / temperature): returns
    (logprobs (B, T) in float32 at least, logits divided by the temperature). `model` is the module or a
    wrapper of it (DDP, peft, torch.compile).

    Only positions with a nonzero weight are scored (`only_trained`): a hook on the model's output layer hands it
    just those positions' hidden states, so the output layer and the log-softmax run on them alone (an SFT batch
    trains ~1/4 of its positions: the prompts and the padding cost nothing past the last layer). The logits
    returned are then (N, V), N = the trained positions in row-major order of `weights != 0`, and the log-probs
    of untrained positions are 0. A model without an output layer to hook, or a compiled one (whose graph would
    break on the data-dependent shape), computes every position's logits, cut to the same (N, V). With
    `only_trained=False` the logits are (B, T, V) and every position is scored.

    `use_cache=False` is what keeps packed examples apart: without a cache, transformers reads example
    boundaries from `position_ids` (restarting at 0) and builds a block-diagonal causal mask; with the
    config's default `use_cache=True` it makes a cache, skips that, and packed examples attend to each other.
    No attention mask is passed: padding is only ever at the end of a row or of its own block.
    """
    kwargs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    if not only_trained:
        logits_B_T_V = model(**kwargs).logits
        if temperature != 1.0:
            logits_B_T_V = logits_B_T_V / temperature
        return token_logprobs(logits_B_T_V, batch["target_tokens"]), logits_B_T_V
    trained_B_T = batch["weights"] != 0
    head, calls = _output_layer(model), []

    def trained_rows(module, args):
        calls.append(module)
        if len(calls) > 1:  # refused below: leave a second call's input (of any shape) alone
            return None
        return (args[0][trained_B_T][None], *args[1:])

    handle = head.register_forward_pre_hook(trained_rows) if head is not None else None
    try:
        logits = model(**kwargs).logits
    finally:
        if handle is not None:
            handle.remove()
    if len(calls) > 1:
        raise RuntimeError(f"{type(model).__name__} calls its output layer {len(calls)} times in one forward; score it "
                           "with forward_logprobs(..., only_trained=False)")
    # Hooked: (1, N, V). Not (a compiled model, or one whose output layer is no module call): (B, T, V), cut here.
    logits_N_V = logits[0] if calls else logits[trained_B_T]
    if temperature != 1.0:
        logits_N_V = logits_N_V / temperature
    logprobs_N = token_logprobs(logits_N_V, batch["target_tokens"][trained_B_T])
    return at_positions(logprobs_N, trained_B_T), logits_N_V


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
