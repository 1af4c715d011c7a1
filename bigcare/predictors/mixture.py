"""A mixture of M Laplace members per voxel: its mean, central interval and disagreement (torch).

An ensemble of M probabilistic CARE networks predicts, per voxel, M Laplace distributions
``p_k = Laplace(mu_k, b_k)``; their equal-weight mixture ``p = (1/M) sum_k p_k`` is the
ensemble's prediction (CARE Fig. 5, Methods)::

    mu, b (M, V) ──► mean      (1/M) sum_k mu_k                         (the mixture mean)
                 ──► interval  F^-1((1 - level) / 2), F^-1((1 + level) / 2) of the mixture CDF
                               F = (1/M) sum_k F_k, by vectorised bisection between the
                               smallest and largest member quantile (F is monotone there)
                 ──► D         (1/M) sum_k KL(p_k || p) / log M              in [0, 1]

Why ``log M``: ``p >= p_k / M`` everywhere, so ``log p_k - log p <= log M`` and every
``KL(p_k || p) <= log M``; the bound is reached when the members do not overlap at all. D is 0
when all members agree, 1 when they are disjoint, and does not depend on the intensity units
(KL is invariant under the affine map the denormalization applies).

The KL is an expectation under ``p_k``; in the member's own standardised variable
``x = mu_k + s b_k t`` (``s = +-1`` with probability 1/2, ``t ~ Exp(1)``) it is
``E[log p_k(x) - log p(x)]`` with ``log p_k(x) = -log(2 b_k) - t``, integrated by a fixed
``N_NODES``-point Gauss-Laguerre rule in ``t``. The rule is exact for polynomial integrands; the
mixture's kinks at the other members' means limit it to about 0.5% of ``log M`` (measured
against a fine grid, see tests/test_ensemble.py). Every voxel is computed on its own, so blockwise
equals whole-volume results; voxels go through in chunks of at most ``CHUNK_BYTES`` of
intermediate values.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["mixture_mean", "mixture_interval", "disagreement", "laplace_cdf", "N_NODES", "CHUNK_BYTES"]

#: Gauss-Laguerre nodes of the KL quadrature
N_NODES = 32
#: intermediate bytes per voxel chunk of the KL quadrature and the bisection
CHUNK_BYTES = 1 << 26
#: bisection steps: the bracket shrinks by 2**-BISECTIONS (below float32 resolution)
BISECTIONS = 32


def laplace_cdf(x: torch.Tensor, mu: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Laplace CDF ``F(x)`` of ``Laplace(mu, b)``, elementwise."""
    z = (x - mu) / b
    return 0.5 - 0.5 * torch.sign(z) * torch.expm1(-z.abs())  # 1/2 e^z below mu, 1 - 1/2 e^-z above


def _chunks(n_voxels: int, bytes_per_voxel: int):
    step = max(1024, CHUNK_BYTES // max(1, bytes_per_voxel))
    for a in range(0, n_voxels, step):
        yield slice(a, min(a + step, n_voxels))


def mixture_mean(mu: torch.Tensor) -> torch.Tensor:
    """Mean of the equal-weight mixture: the members' average mean (``mu``: (M, V))."""
    return mu.mean(dim=0)


def mixture_interval(mu: torch.Tensor, b: torch.Tensor, level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Central ``level`` interval of the mixture of ``Laplace(mu_k, b_k)``, per voxel.

    Parameters
    ----------
    mu, b : torch.Tensor
        (M, V) means and scales (``b > 0``).
    level : float
        In (0, 1): the mixture puts this mass between the bounds, half the rest on each side.

    Returns
    -------
    lower, upper : torch.Tensor
        (V,) each.
    """
    lower = torch.empty(mu.shape[1], dtype=mu.dtype, device=mu.device)
    upper = torch.empty_like(lower)
    for part in _chunks(mu.shape[1], mu.element_size() * mu.shape[0] * 4):
        m, s = mu[:, part], b[:, part]
        for q, out in (((1 - level) / 2, lower), ((1 + level) / 2, upper)):
            # member quantiles bracket the mixture's: F <= q at the smallest, >= q at the largest
            member = m + s * (math.log(2 * q) if q < 0.5 else -math.log(2 * (1 - q)))
            lo, hi = member.min(dim=0).values, member.max(dim=0).values
            for _ in range(BISECTIONS):
                mid = 0.5 * (lo + hi)
                below = laplace_cdf(mid[None], m, s).mean(dim=0) < q
                lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
            out[part] = 0.5 * (lo + hi)
    return lower, upper


_NODES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _laguerre(device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    key = (str(device), dtype)
    if key not in _NODES:
        t, w = np.polynomial.laguerre.laggauss(N_NODES)
        _NODES[key] = (torch.as_tensor(t, dtype=dtype, device=device), torch.as_tensor(w, dtype=dtype, device=device))
    return _NODES[key]


def disagreement(mu: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Average KL divergence of the members to their mixture, divided by ``log M``, per voxel.

    Parameters
    ----------
    mu, b : torch.Tensor
        (M, V) means and scales (``b > 0``) of M >= 2 Laplace members.

    Returns
    -------
    torch.Tensor
        (V,) in [0, 1] (clipped: the quadrature's rounding may stray a little outside).
    """
    n_members = mu.shape[0]
    if n_members < 2:
        raise ValueError(f"disagreement needs at least 2 members, got {n_members}")
    t, w = _laguerre(mu.device, mu.dtype)
    out = torch.empty(mu.shape[1], dtype=mu.dtype, device=mu.device)
    log_m = math.log(n_members)
    for part in _chunks(mu.shape[1], mu.element_size() * N_NODES * n_members * 3):
        m, s = mu[:, part], b[:, part]  # (M, v)
        log_norm = -torch.log(2 * s)  # log density of each member at its own mean
        total = torch.zeros(m.shape[1], dtype=mu.dtype, device=mu.device)
        for k in range(n_members):
            for sign in (-1.0, 1.0):
                x = m[k] + sign * s[k] * t[:, None]  # (nodes, v)
                log_pk = log_norm[k] - t[:, None]
                log_each = log_norm[:, None] - (x[None] - m[:, None]).abs() / s[:, None]  # (M, nodes, v)
                log_mix = torch.logsumexp(log_each, dim=0) - log_m
                total += 0.5 * (w[:, None] * (log_pk - log_mix)).sum(dim=0)
        out[part] = (total / n_members / log_m).clamp(0.0, 1.0)
    return out
