"""Naive float64 references that build full logits: the independent yardstick for trl_tip's chunked math."""

import torch


def reference_logits(hidden, weight, bias=None, logit_scale=1.0, softcap=None, temperature=1.0):
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def reference_stats(student_logits, teacher_logits):
    """Entropy of the student, KL(S || T) and KL(T || S), per token, from full float64 logits."""
    log_ps = torch.log_softmax(student_logits.double(), -1)
    log_pt = torch.log_softmax(teacher_logits.double(), -1)
    ps, pt = log_ps.exp(), log_pt.exp()
    entropy = -(ps * log_ps).sum(-1)
    reverse_kl = (ps * (log_ps - log_pt)).sum(-1)
    forward_kl = (pt * (log_pt - log_ps)).sum(-1)
    return entropy, reverse_kl, forward_kl


def reference_entropy(logits):
    """Entropy in nats of the softmax of full float64 logits, per token (e.g. the teacher's `H(P_T)`)."""
    log_p = torch.log_softmax(logits.double(), -1)
    return -(log_p.exp() * log_p).sum(-1)


def reference_gjsd(student_logits, teacher_logits, beta):
    """Per-token generalized JSD with TRL's convention: beta=0 KL(T||S), beta=1 KL(S||T), else the mixture form."""
    log_ps = torch.log_softmax(student_logits.double(), -1)
    log_pt = torch.log_softmax(teacher_logits.double(), -1)
    ps, pt = log_ps.exp(), log_pt.exp()
    if beta == 0:
        return (pt * (log_pt - log_ps)).sum(-1)
    if beta == 1:
        return (ps * (log_ps - log_pt)).sum(-1)
    m = (1 - beta) * ps + beta * pt
    log_m = m.log()
    return beta * (pt * (log_pt - log_m)).sum(-1) + (1 - beta) * (ps * (log_ps - log_m)).sum(-1)


def ragged_mask(lengths, width):
    return torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
