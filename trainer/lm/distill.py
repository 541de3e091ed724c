"""Off-policy distillation (knowledge distillation): on a dataset's own completions, the student matches the teacher's
next-token distribution at every trained position. Pure functions; `SFTTrainer(..., teacher=model)` calls them.

    scores = distill_scores(student, teacher, batch, divergence_fn("top_k", top_k=20))
    loss, metrics = distill_loss(scores, batch, weight=1.0)   # (1 - w) NLL + w divergence, per trained token

A divergence is registered by name (`register_divergence`): a pure function of one chunk of rows, the student's
log-probs (n, V) and the teacher's (n, V), returning each row's divergence and, when asked, its gradient in the
student's logits (n, V); the backward is written once, around it. Registered here:

| name | what | settings |
|---|---|---|
| `forward_kl` | KL(teacher ‖ student) over the whole vocabulary (Hinton et al. 2015; GKD's supervised KD) | |
| `top_k` | the same over the teacher's k most likely tokens and one tail bucket holding the rest of each model's mass (the Tinker cookbook keeps a teacher's top 20); k = V is `forward_kl` | `top_k` |
| `jsd` | GKD's generalized Jensen-Shannon divergence (Agarwal et al. 2024): β KL(teacher ‖ M) + (1 - β) KL(student ‖ M), M = β teacher + (1 - β) student; β = 0 is forward KL and β = 1 reverse KL, as TRL's `generalized_jsd_loss` | `beta` |

Neither model's (tokens x vocabulary) logits are ever made: both forwards stop at the final hidden states of the
trained positions (`lm.losses.output_hidden`), and both output layers run on chunks of rows holding at most
`lm.losses.CHUNK_ELEMENTS` logits, each chunk under activation checkpointing: its logits (the student's and the
teacher's) are recomputed in the backward instead of kept, so one chunk is alive at a time. The student's log-probs
of the dataset's own tokens come out of the same chunks: the hard-label loss costs no second pass.

Each trained token weighs its loss weight, and a micro-batch's loss is its mean per trained token, so the engine's
weighted step makes a step's loss and gradient the mean over every trained token of the step, however it is split.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, NamedTuple

import torch
import torch.utils.checkpoint
from torch.autograd.function import once_differentiable

from .losses import OutputLogits, _chunks, at_positions, output_hidden
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


def _plogp(logp_n_V: torch.Tensor) -> torch.Tensor:
    """Σ_v p log p per row, 0 log 0 = 0 (a token with no mass adds nothing, whatever its log says)."""
    p_n_V = logp_n_V.exp()
    return torch.where(p_n_V > 0, p_n_V * logp_n_V, 0.0).sum(-1)


@register_divergence("forward_kl")
def forward_kl(logp_n_V, teacher_logp_n_V, *, grad: bool):
    """KL(q ‖ p) = Σ q (log q - log p), q the teacher's distribution; d/dlogits = p - q."""
    q_n_V = teacher_logp_n_V.exp()
    kl_n = _plogp(teacher_logp_n_V) - torch.where(q_n_V > 0, q_n_V * logp_n_V, 0.0).sum(-1)
    return kl_n, (logp_n_V.exp().sub_(q_n_V) if grad else None)


@register_divergence("top_k")
def top_k_kl(logp_n_V, teacher_logp_n_V, *, grad: bool, top_k: int):
    """KL over k + 1 buckets: the teacher's k most likely tokens, one each, and the rest of the vocabulary as one
    tail bucket, in both distributions (each sums to 1 over the buckets). d/dlogit_j = p_j - q_j for a top token,
    p_j (1 - q_tail / p_tail) for one in the tail."""
    V = logp_n_V.shape[-1]
    k = min(top_k, V)
    logq_n_K, ids_n_K = teacher_logp_n_V.topk(k, dim=-1)
    logp_n_K = logp_n_V.gather(1, ids_n_K)
    q_n_K = logq_n_K.exp()
    kl_n = _plogp(logq_n_K) - (q_n_K * logp_n_K).sum(-1)
    ratio_n = None
    if k < V:  # the tail bucket: log of each model's mass outside the teacher's top k
        log_q_tail_n = teacher_logp_n_V.scatter(1, ids_n_K, -math.inf).logsumexp(-1)
        log_p_tail_n = logp_n_V.scatter(1, ids_n_K, -math.inf).logsumexp(-1)
        q_tail_n = log_q_tail_n.exp()
        kl_n = kl_n + torch.where(q_tail_n > 0, q_tail_n * (log_q_tail_n - log_p_tail_n), 0.0)
        ratio_n = torch.where(q_tail_n > 0, (log_q_tail_n - log_p_tail_n).exp(), 0.0)
    if not grad:
        return kl_n, None
    p_n_V = logp_n_V.exp()
    grad_n_V = p_n_V * (1 - ratio_n[:, None]) if ratio_n is not None else p_n_V.clone()
    grad_n_V.scatter_(1, ids_n_K, p_n_V.gather(1, ids_n_K) - q_n_K)
    return kl_n, grad_n_V


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
        q_n_V = teacher_logp_n_V.exp()
        div_n = (beta * torch.where(q_n_V > 0, q_n_V * (teacher_logp_n_V - logm_n_V), 0.0).sum(-1)
                 + (1 - beta) * (p_n_V * (logp_n_V - logm_n_V)).sum(-1))
        u_n_V = (logp_n_V - logm_n_V).mul_(1 - beta)
    if not grad:
        return div_n, None
    u_n_V.sub_((p_n_V * u_n_V).sum(-1, keepdim=True))
    return div_n, u_n_V.mul_(p_n_V)


class DistillScores(NamedTuple):
    """Per trained position (B, T), 0 elsewhere; both differentiable in the student."""

    divergence: torch.Tensor  # the student's divergence from the teacher at the position
    logprobs: torch.Tensor  # the student's log-probability of the dataset's token there (the hard label)


def distill_scores(student, teacher, batch: dict[str, torch.Tensor], divergence: Callable) -> DistillScores:
    """Both models' forwards over `batch` (the teacher's without gradient), scored at its trained positions in
    chunks (`chunked_distillation`). The models must share the vocabulary (their output layers' width)."""
    with torch.no_grad():
        taught = output_hidden(teacher, batch)
    learner = output_hidden(student, batch)
    divergence_N, logprobs_N = chunked_distillation(learner.hidden_N_H, learner.logits_fn, taught.hidden_N_H,
                                                    taught.logits_fn, learner.targets_N, divergence)
    return DistillScores(at_positions(divergence_N, learner.scored_B_T), at_positions(logprobs_N, learner.scored_B_T))


def distill_loss(scores: DistillScores, batch: dict[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
    """`loss`: Σ_t w_t ((1 - weight) (-log p(x_t)) + weight · divergence_t) / Σ_t w_t over the trained tokens (w_t the
    batch's loss weights), and its two parts, `distill/kl` and `distill/nll` (detached), each per trained token."""
    weights_B_T = batch["weights"].to(scores.logprobs.dtype)
    total = weights_B_T.sum().clamp_min(torch.finfo(weights_B_T.dtype).tiny)  # no trained token: 0, not NaN
    kl = (scores.divergence * weights_B_T).sum() / total
    nll = -(scores.logprobs * weights_B_T).sum() / total
    loss = kl if weight == 1 else nll if weight == 0 else (1 - weight) * nll + weight * kl
    return {"loss": loss, "distill/kl": kl.detach(), "distill/nll": nll.detach()}


def chunked_distillation(hidden_N_H: torch.Tensor, logits_fn: OutputLogits | None, teacher_hidden_N_H: torch.Tensor,
                         teacher_logits_fn: OutputLogits | None, targets_N: torch.Tensor, divergence: Callable):
    """(divergence (N,), the student's log-probs of `targets_N` (N,)) from the two models' final hidden states of the
    same N positions (a `logits_fn` None: those hidden states are the model's logits), in chunks of rows of at most
    CHUNK_ELEMENTS logits, each under non-reentrant activation checkpointing (recomputed in the backward)."""
    V = logits_fn.vocabulary if logits_fn is not None else hidden_N_H.shape[-1]
    V_teacher = teacher_logits_fn.vocabulary if teacher_logits_fn is not None else teacher_hidden_N_H.shape[-1]
    if V != V_teacher:
        raise ValueError(f"teacher: its output layer makes {V_teacher} logits a position and the student's {V}: "
                         "distilling a distribution needs the same vocabulary in both")
    grad = torch.is_grad_enabled() and (hidden_N_H.requires_grad or any(
        p.requires_grad for p in (logits_fn.head.parameters() if logits_fn is not None else ())))
    fn = functools.partial(_distill_chunk, logits_fn=logits_fn, teacher_logits_fn=teacher_logits_fn,
                           divergence=divergence)
    parts = []
    for rows in _chunks(len(targets_N), V) or [slice(0, 0)]:  # no position at all: still a result in the graph
        inputs = hidden_N_H[rows], teacher_hidden_N_H[rows], targets_N[rows]
        parts.append(torch.utils.checkpoint.checkpoint(fn, *inputs, use_reentrant=False) if grad else fn(*inputs))
    divergence_N, logprobs_N = (torch.cat(column) for column in zip(*parts))
    return divergence_N, logprobs_N


def _float_logits(logits_n_V: torch.Tensor) -> torch.Tensor:
    return logits_n_V.to(torch.promote_types(logits_n_V.dtype, torch.float32))


def _distill_chunk(hidden_n_H, teacher_hidden_n_H, targets_n, *, logits_fn, teacher_logits_fn, divergence):
    """One chunk: the student's logits (through autograd, so any output layer works, a LoRA-wrapped one too), the
    teacher's log-probs (no gradient), and `_Distill` on them."""
    logits_n_V = _float_logits(logits_fn(hidden_n_H) if logits_fn is not None else hidden_n_H)
    with torch.no_grad():
        teacher_n_V = _float_logits(teacher_logits_fn(teacher_hidden_n_H) if teacher_logits_fn is not None
                                    else teacher_hidden_n_H)
        teacher_logp_n_V = torch.log_softmax(teacher_n_V, dim=-1)
        del teacher_n_V
    return _Distill.apply(logits_n_V, teacher_logp_n_V, targets_n, divergence)


class _Distill(torch.autograd.Function):
    """(divergence (n,), log p(target) (n,)) from the student's logits (n, V); the backward recomputes the
    log-softmax and writes d/dlogits out: g_div · divergence's gradient + g_lp (onehot - p). Run under
    checkpointing, what it saves lives for one chunk's backward only."""

    @staticmethod
    def forward(ctx, logits_n_V, teacher_logp_n_V, targets_n, divergence):
        logp_n_V = torch.log_softmax(logits_n_V, dim=-1)
        divergence_n, _ = divergence(logp_n_V, teacher_logp_n_V, grad=False)
        logprobs_n = logp_n_V.gather(1, targets_n[:, None]).squeeze(1)
        ctx.divergence = divergence
        ctx.save_for_backward(logits_n_V, teacher_logp_n_V, targets_n)
        return divergence_n, logprobs_n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_divergence_n, grad_logprobs_n):
        logits_n_V, teacher_logp_n_V, targets_n = ctx.saved_tensors
        logp_n_V = torch.log_softmax(logits_n_V, dim=-1)
        _, g_n_V = ctx.divergence(logp_n_V, teacher_logp_n_V, grad=True)
        g_n_V.mul_(grad_divergence_n[:, None])
        p_n_V = logp_n_V.exp_()
        g_n_V.sub_(p_n_V.mul_(grad_logprobs_n[:, None]))
        g_n_V.scatter_add_(1, targets_n[:, None], grad_logprobs_n[:, None])
        return g_n_V, None, None, None
