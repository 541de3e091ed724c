"""Off-policy distillation (knowledge distillation): on a dataset's own completions, the student matches the teacher's
next-token distribution at every trained position. Pure functions; `SFTTrainer(..., teacher=model)` calls them.

    out = distill_loss(student, teacher, batch, divergence_fn("top_k", top_k=20), weight=1.0)
    out["loss"].backward()    # (1 - w) NLL + w divergence per trained token; out["distill/kl"], out["distill/nll"]

A divergence is registered by name (`register_divergence`): a pure function of one chunk of rows, the student's
log-probs (n, V) and the teacher's (n, V), returning each row's divergence and, when asked, its gradient in the
student's logits (n, V); the chain into the hidden states and the output layer is written once, around it.
Registered here:

| name | what | settings |
|---|---|---|
| `forward_kl` | KL(teacher ‖ student) over the whole vocabulary (Hinton et al. 2015; GKD's supervised KD) | |
| `top_k` | the same over the teacher's k most likely tokens and one tail bucket holding the rest of each model's mass; k = V is `forward_kl` | `top_k` |
| `top_k_renormalized` | the Tinker cookbook's soft targets (`distillation/train_off_policy.py`, k = 20 there): the teacher's top k renormalized to sum to 1, no tail; its cross-entropy's gradient, its value less the targets' entropy | `top_k` |
| `jsd` | GKD's generalized Jensen-Shannon divergence (Agarwal et al. 2024): β KL(teacher ‖ M) + (1 - β) KL(student ‖ M), M = β teacher + (1 - β) student; β = 0 is forward KL and β = 1 reverse KL, as TRL's `generalized_jsd_loss` | `beta` |

Neither model's (tokens x vocabulary) logits are ever made: both forwards stop at the final hidden states of the
trained positions (`lm.losses.output_hidden`), and both output layers run on chunks of rows holding at most
CHUNK_ELEMENTS logits. The loss is known before its backward (a weighted sum over positions), so with a plain
`nn.Linear` output layer (every transformers causal LM's) its gradient is computed chunk by chunk in the forward
itself, into the hidden states and the layer's weight (`_FusedDistill`, as Liger's fused linear cross-entropy does):
no logits are recomputed, and one chunk is alive at a time. Any other output layer (a LoRA-wrapped one) runs each
chunk under activation checkpointing instead, through autograd. The student's log-probs of the dataset's own tokens
come out of the same chunks: the hard-label loss costs no second pass.

Each trained token weighs its loss weight, and a micro-batch's loss is its mean per trained token, so the engine's
weighted step makes a step's loss and gradient the mean over every trained token of the step, however it is split.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable

import torch
import torch.utils.checkpoint
from torch.autograd.function import once_differentiable

from .losses import OutputLogits, _chunk_logits, _Spec, output_hidden
from .registry import lookup, registrar

DIVERGENCES: dict[str, Callable] = {}
DIVERGENCE_SETTINGS = ("top_k", "beta")  # what a divergence may read (SFTConfig's distill_top_k, distill_beta)

register_divergence = registrar(DIVERGENCES, "divergence", """Register `fn(logp_n_V, teacher_logp_n_V, *, grad,
**settings) -> (divergence_n, grad_n_V or None)` under a new name (a taken name is refused): each row's divergence of
the student (log-probs `logp_n_V`, float32) from the teacher, and with `grad` its gradient in the student's logits.
The settings it reads are its keyword arguments, among DIVERGENCE_SETTINGS.""")


def divergence_fn(name: str, **settings) -> Callable:
    """The registered divergence `name` with the settings it reads (its keyword arguments) bound; the others are
    dropped. An unknown name is an error naming the choices."""
    fn = lookup(DIVERGENCES, name, "distill")
    return functools.partial(fn, **{k: v for k, v in settings.items() if k in divergence_reads(name)})


def divergence_reads(name: str) -> tuple[str, ...]:
    """The settings the divergence `name` reads (its keyword arguments among DIVERGENCE_SETTINGS)."""
    parameters = inspect.signature(lookup(DIVERGENCES, name, "distill")).parameters
    return tuple(k for k in DIVERGENCE_SETTINGS if k in parameters)


# The log-probs a divergence gets are finite: floored at the dtype's lowest value (`_log_softmax`), so a token with no
# mass adds 0 · (finite) to a sum, and no divergence needs a guard against 0 · log 0.


@register_divergence("forward_kl")
def forward_kl(logp_n_V, teacher_logp_n_V, *, grad: bool):
    """KL(q ‖ p) = Σ q (log q - log p), q the teacher's distribution; d/dlogits = p - q."""
    q_n_V = teacher_logp_n_V.exp()
    kl_n = (teacher_logp_n_V - logp_n_V).mul_(q_n_V).sum(-1)
    return kl_n, (logp_n_V.exp().sub_(q_n_V) if grad else None)


@register_divergence("top_k")
def top_k_kl(logp_n_V, teacher_logp_n_V, *, grad: bool, top_k: int):
    """KL over k + 1 buckets: the teacher's k most likely tokens, one each, and the rest of the vocabulary as one
    tail bucket, in both distributions (each sums to 1 over the buckets). d/dlogit_j = p_j - q_j for a top token,
    p_j (1 - q_tail / p_tail) for one in the tail."""
    V = logp_n_V.shape[-1]
    k = min(top_k, V)
    logq_n_K, ids_n_K = teacher_logp_n_V.topk(k, dim=-1)
    q_n_K = logq_n_K.exp()
    kl_n = (logq_n_K - logp_n_V.gather(1, ids_n_K)).mul_(q_n_K).sum(-1)
    ratio_n = None
    if k < V:  # the tail bucket: log of each model's mass outside the teacher's top k
        log_q_tail_n = teacher_logp_n_V.scatter(1, ids_n_K, -math.inf).logsumexp(-1)
        log_p_tail_n = logp_n_V.scatter(1, ids_n_K, -math.inf).logsumexp(-1)
        kl_n += log_q_tail_n.exp() * (log_q_tail_n - log_p_tail_n)
        ratio_n = (log_q_tail_n - log_p_tail_n).exp()
    if not grad:
        return kl_n, None
    p_n_V = logp_n_V.exp()
    p_n_K = p_n_V.gather(1, ids_n_K)
    if ratio_n is not None:
        p_n_V.mul_(1 - ratio_n[:, None])
    return kl_n, p_n_V.scatter_(1, ids_n_K, p_n_K - q_n_K)


@register_divergence("top_k_renormalized")
def top_k_renormalized(logp_n_V, teacher_logp_n_V, *, grad: bool, top_k: int):
    """Σ_k q̃_k (log q̃_k - log p_k) over the teacher's k most likely tokens, q̃ their probabilities renormalized to
    sum to 1 and p the student's own (not renormalized): the Tinker cookbook's cross-entropy on soft targets less
    q̃'s entropy, so 0 only when the student puts q̃ on those k tokens and nothing elsewhere; d/dlogit_j = p_j - q̃_j
    (q̃ = 0 off the top k)."""
    logq_n_K, ids_n_K = teacher_logp_n_V.topk(min(top_k, logp_n_V.shape[-1]), dim=-1)
    logq_n_K = logq_n_K - logq_n_K.logsumexp(-1, keepdim=True)
    q_n_K = logq_n_K.exp()
    kl_n = (logq_n_K - logp_n_V.gather(1, ids_n_K)).mul_(q_n_K).sum(-1)
    return kl_n, (logp_n_V.exp().scatter_add_(1, ids_n_K, -q_n_K) if grad else None)


@register_divergence("jsd")
def generalized_jsd(logp_n_V, teacher_logp_n_V, *, grad: bool, beta: float):
    """β KL(q ‖ m) + (1 - β) KL(p ‖ m), m = β q + (1 - β) p; β = 0: KL(q ‖ p), β = 1: KL(p ‖ q) (TRL's endpoints).
    With u = ∂/∂p = (1 - β)(log p - log m) (reverse KL: log p - log q), d/dlogits = p (u - Σ p u)."""
    if beta == 0:
        return forward_kl(logp_n_V, teacher_logp_n_V, grad=grad)
    p_n_V = logp_n_V.exp()
    if beta == 1:
        u_n_V = logp_n_V - teacher_logp_n_V
        div_n = (p_n_V * u_n_V).sum(-1)
    else:
        logm_n_V = torch.logaddexp(teacher_logp_n_V + math.log(beta), logp_n_V + math.log1p(-beta))
        div_n = beta * (teacher_logp_n_V - logm_n_V).mul_(teacher_logp_n_V.exp()).sum(-1)
        u_n_V = logp_n_V.sub(logm_n_V).mul_(1 - beta)
        del logm_n_V
        div_n += (p_n_V * u_n_V).sum(-1)  # (1 - β) KL(p ‖ m)
    if not grad:
        return div_n, None
    u_n_V.sub_((p_n_V * u_n_V).sum(-1, keepdim=True))
    return div_n, u_n_V.mul_(p_n_V)


# A chunk here holds a quarter of the NLL's CHUNK_ELEMENTS logits: it keeps about five (rows x V) buffers alive at
# once (both models' log-probs, the teacher's probabilities, the gradient, a temporary), against the NLL's two. Off-policy
# KD at vocabulary 32k (benchmarks/distill.py, 2026-12-07) peaked 710-800 MB with it against 895-915 MB with 16M logits,
# and took 1.3 CPU s a step against 1.9-2.1.
CHUNK_ELEMENTS = 1 << 22


def distill_loss(student, teacher, batch: dict[str, torch.Tensor], divergence: Callable,
                 weight: float) -> dict[str, torch.Tensor]:
    """`loss`: Σ_t w_t ((1 - weight) (-log p(x_t)) + weight · divergence_t) / Σ_t w_t over the batch's trained tokens
    (w_t its loss weights, x_t the dataset's tokens), differentiable in the student; its two parts, `distill/kl` and
    `distill/nll` (detached), each per trained token. Both models' forwards run here (the teacher's without
    gradient); they must share the vocabulary (their output layers' width). A batch with no trained token: 0."""
    with torch.no_grad():
        taught = output_hidden(teacher, batch)
    learner = output_hidden(student, batch)
    weights_N = batch["weights"][learner.scored_B_T].to(torch.promote_types(learner.hidden_N_H.dtype, torch.float32))
    total = weights_N.sum().clamp_min(torch.finfo(weights_N.dtype).tiny)
    loss, divergence_N, logprobs_N = chunked_distillation(
        learner.hidden_N_H, learner.logits_fn, taught.hidden_N_H, taught.logits_fn, learner.targets_N, divergence,
        weight * weights_N / total, (1 - weight) * weights_N / total)
    return {"loss": loss, "distill/kl": (divergence_N * weights_N).sum() / total,
            "distill/nll": -(logprobs_N * weights_N).sum() / total}


def chunked_distillation(hidden_N_H: torch.Tensor, logits_fn: OutputLogits | None, teacher_hidden_N_H: torch.Tensor,
                         teacher_logits_fn: OutputLogits | None, targets_N: torch.Tensor, divergence: Callable,
                         divergence_coef_N: torch.Tensor, nll_coef_N: torch.Tensor):
    """(loss, divergence (N,), log p(target) (N,)): loss = Σ_n divergence_coef_n · divergence_n - nll_coef_n · log
    p(target_n), differentiable in the student, the other two detached; from both models' final hidden states of
    the same N positions (a `logits_fn` None: those hidden states are the model's logits), in chunks of rows of at
    most CHUNK_ELEMENTS logits. A plain linear output layer (or none) goes through `_FusedDistill`; any other runs
    each chunk under non-reentrant activation checkpointing, through autograd."""
    V = logits_fn.vocabulary if logits_fn is not None else hidden_N_H.shape[-1]
    V_teacher = teacher_logits_fn.vocabulary if teacher_logits_fn is not None else teacher_hidden_N_H.shape[-1]
    if V != V_teacher:
        raise ValueError(f"teacher: its output layer makes {V_teacher} logits a position and the student's {V}: "
                         "distilling a distribution needs the same vocabulary in both")
    head = logits_fn.head if logits_fn is not None else None
    teacher_fn = teacher_logits_fn or (lambda logits_n_V: logits_n_V)
    if head is None or type(head) is torch.nn.Linear:
        spec = _Spec.of(logits_fn, 1.0, None, False, hidden_N_H)
        weight, bias = (head.weight, head.bias) if head is not None else (None, None)
        return _FusedDistill.apply(hidden_N_H, weight, bias, teacher_hidden_N_H, targets_N, divergence_coef_N,
                                   nll_coef_N, spec, teacher_fn, divergence)
    grad = torch.is_grad_enabled() and (hidden_N_H.requires_grad or any(p.requires_grad for p in head.parameters()))
    fn = functools.partial(_distill_chunk, logits_fn=logits_fn, teacher_fn=teacher_fn, divergence=divergence)
    parts = []
    for rows in _rows(len(targets_N), V):
        inputs = hidden_N_H[rows], teacher_hidden_N_H[rows], targets_N[rows]
        parts.append(torch.utils.checkpoint.checkpoint(fn, *inputs, use_reentrant=False) if grad else fn(*inputs))
    divergence_N, logprobs_N = (torch.cat(column) for column in zip(*parts))
    loss = (divergence_coef_N * divergence_N).sum() - (nll_coef_N * logprobs_N).sum()
    return loss, divergence_N.detach(), logprobs_N.detach()


def _rows(N: int, V: int) -> list[slice]:
    """Chunks of rows holding at most CHUNK_ELEMENTS logits; one empty chunk when there is no row (a loss of 0 still
    in the graph)."""
    rows = max(1, CHUNK_ELEMENTS // V)
    return [slice(start, start + rows) for start in range(0, N, rows)] or [slice(0, 0)]


def _log_softmax(logits_n_V: torch.Tensor) -> torch.Tensor:
    """log-softmax in float32 at least, floored at the dtype's lowest finite value: a token with no mass (a logit of
    -inf) then adds 0 · (finite) to every sum instead of a NaN, and no divergence needs a guard for it."""
    logp_n_V = torch.log_softmax(_float_logits(logits_n_V), dim=-1)
    return logp_n_V.clamp_min_(torch.finfo(logp_n_V.dtype).min)


class _FusedDistill(torch.autograd.Function):
    """The loss of `chunked_distillation` through a linear output layer (or none), its gradient made in the forward:
    for each chunk, the student's logits x = softcap(scale (h W^T + b)), both log-softmaxes, the divergence with its
    gradient g_div in x, and d loss / dx = c_div g_div + c_nll (p - onehot(target)), carried through the soft-cap and
    scale and into the hidden states, W and b by two matmuls. The backward only scales them by the loss's grad."""

    @staticmethod
    def forward(ctx, hidden_N_H, weight_V_H, bias_V, teacher_hidden_N_H, targets_N, divergence_coef_N, nll_coef_N,
                spec, teacher_fn, divergence):
        N, V = len(targets_N), weight_V_H.shape[0] if weight_V_H is not None else hidden_N_H.shape[-1]
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad = need_hidden or need_weight or need_bias
        grad_hidden = torch.zeros_like(hidden_N_H) if need_hidden else None
        grad_weight = torch.zeros_like(weight_V_H) if need_weight else None
        grad_bias = torch.zeros_like(bias_V) if need_bias else None
        dtype = torch.promote_types(spec.dtype, torch.float32)  # the chunks' logits'
        divergence_N, logprobs_N = hidden_N_H.new_zeros(N, dtype=dtype), hidden_N_H.new_zeros(N, dtype=dtype)
        for rows in _rows(N, V):
            hidden_n_H, targets_n = hidden_N_H[rows], targets_N[rows]
            x_n_V, tanh_n_V = _chunk_logits(hidden_n_H, weight_V_H, bias_V, spec)
            logp_n_V = _log_softmax(x_n_V)
            del x_n_V
            teacher_logp_n_V = _log_softmax(teacher_fn(teacher_hidden_N_H[rows]))
            divergence_n, g_n_V = divergence(logp_n_V, teacher_logp_n_V, grad=grad)
            del teacher_logp_n_V
            divergence_N[rows] = divergence_n
            logprobs_N[rows] = logp_n_V.gather(1, targets_n[:, None]).squeeze(1)
            if not grad:
                continue
            c_nll_n = nll_coef_N[rows, None].to(g_n_V.dtype)
            g_n_V.mul_(divergence_coef_N[rows, None].to(g_n_V.dtype)).add_(logp_n_V.exp_().mul_(c_nll_n))
            del logp_n_V
            g_n_V.scatter_add_(1, targets_n[:, None], -c_nll_n)
            if tanh_n_V is not None:  # d/dz softcap(scale z) = scale (1 - tanh^2)
                g_n_V.mul_(tanh_n_V.square_().neg_().add_(1))
            if spec.scale != 1.0:
                g_n_V.mul_(spec.scale)
            if weight_V_H is None:
                grad_hidden[rows] = g_n_V.to(hidden_N_H.dtype)
                continue
            g_n_V = g_n_V.to(spec.dtype)
            if need_hidden:
                grad_hidden[rows] = (g_n_V @ weight_V_H.to(spec.dtype)).to(hidden_N_H.dtype)
            if need_weight:
                grad_weight.add_((g_n_V.T @ hidden_n_H.to(spec.dtype)).to(weight_V_H.dtype))
            if need_bias:
                grad_bias.add_(g_n_V.sum(0).to(bias_V.dtype))
        loss = (divergence_coef_N * divergence_N).sum() - (nll_coef_N * logprobs_N).sum()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(divergence_N, logprobs_N)
        return loss, divergence_N, logprobs_N

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _, __):
        grads = [g * grad_loss.to(g.dtype) if g is not None else None for g in ctx.saved_tensors]
        return (*grads, None, None, None, None, None, None, None)


def _float_logits(logits_n_V: torch.Tensor) -> torch.Tensor:
    return logits_n_V.to(torch.promote_types(logits_n_V.dtype, torch.float32))


def _distill_chunk(hidden_n_H, teacher_hidden_n_H, targets_n, *, logits_fn, teacher_fn, divergence):
    """One chunk through any output layer (autograd makes the logits' gradient into it, a LoRA-wrapped one too): the
    student's logits, the teacher's log-probs (no gradient), and `_Distill` on them."""
    logits_n_V = _float_logits(logits_fn(hidden_n_H))
    with torch.no_grad():
        teacher_logp_n_V = _log_softmax(teacher_fn(teacher_hidden_n_H))
    return _Distill.apply(logits_n_V, teacher_logp_n_V, targets_n, divergence)


class _Distill(torch.autograd.Function):
    """(divergence (n,), log p(target) (n,)) from the student's logits (n, V); the backward recomputes the
    log-softmax and writes d/dlogits out: g_div · divergence's gradient + g_lp (onehot - p). Run under
    checkpointing, what it saves lives for one chunk's backward only."""

    @staticmethod
    def forward(ctx, logits_n_V, teacher_logp_n_V, targets_n, divergence):
        logp_n_V = _log_softmax(logits_n_V)
        divergence_n, _ = divergence(logp_n_V, teacher_logp_n_V, grad=False)
        logprobs_n = logp_n_V.gather(1, targets_n[:, None]).squeeze(1)
        ctx.divergence = divergence
        ctx.save_for_backward(logits_n_V, teacher_logp_n_V, targets_n)
        return divergence_n, logprobs_n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_divergence_n, grad_logprobs_n):
        logits_n_V, teacher_logp_n_V, targets_n = ctx.saved_tensors
        logp_n_V = _log_softmax(logits_n_V)
        _, g_n_V = ctx.divergence(logp_n_V, teacher_logp_n_V, grad=True)
        g_n_V.mul_(grad_divergence_n[:, None])
        p_n_V = logp_n_V.exp_()
        g_n_V.sub_(p_n_V.mul_(grad_logprobs_n[:, None]))
        g_n_V.scatter_add_(1, targets_n[:, None], grad_logprobs_n[:, None])
        return g_n_V, None, None, None
