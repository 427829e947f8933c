"""Hadamard matrices of (almost) any order and the randomised orthogonal rotations built from them.

A Hadamard matrix H_n (entries +-1, H H^T = n I) exists for n = 1, 2 and, conjecturally, every
multiple of 4. Built here from
  Sylvester   H_2n = [[H_n, H_n], [H_n, -H_n]]
  Paley I     H_{q+1} = I + S, S = [[0, 1^T], [-1, Q]], Q_ij = chi(j - i) (q prime, q = 3 mod 4,
              chi the quadratic character mod q)
  Kronecker   H_ab = H_a (x) H_b.
An order none of these reaches gets H_d (x) Q_{n/d}, with d the largest reachable divisor and Q
a seeded random orthogonal matrix: still orthogonal, mixing within blocks of n/d channels.
"""
from __future__ import annotations

from functools import lru_cache

import torch


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    i = 2
    while i * i <= q:
        if q % i == 0:
            return False
        i += 1
    return True


def paley(q: int) -> torch.Tensor:
    """H_{q+1} (float64) for a prime q = 3 mod 4 (Paley I)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, chi[idx]
    return torch.eye(q + 1, dtype=torch.float64) + S


@lru_cache(maxsize=None)
def recipe(n: int) -> tuple[int, ...] | None:
    """The factor orders whose Kronecker product is a Hadamard matrix of order n (2: Sylvester's
    step, p > 2: Paley I with q = p - 1), or None when these constructions cannot reach n."""
    if n == 1:
        return ()
    if n % 2 == 0:
        r = recipe(n // 2)
        if r is not None:
            return r + (2,)
    for p in range(4, n + 1, 4):                                                  # Paley orders q + 1
        if n % p == 0 and (p - 1) % 4 == 3 and _is_prime(p - 1):
            r = recipe(n // p)
            if r is not None:
                return r + (p,)
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n (float64), or None when the constructions above cannot reach n."""
    r = recipe(n)
    if r is None:
        return None
    H = torch.ones(1, 1, dtype=torch.float64)
    two = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for p in r:
        H = torch.kron(H, two if p == 2 else paley(p - 1))
    return H


def largest_order(n: int) -> int:
    """The largest divisor d of n with a Hadamard matrix built here (n itself when possible)."""
    return next(d for d in range(n, 0, -1) if n % d == 0 and recipe(d) is not None)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal n x n matrix (Haar: QR of a Gaussian, signs fixed by R's diagonal)."""
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))[None, :]


def rotation(n: int, seed: int) -> torch.Tensor:
    """R = diag(s) M / sqrt(d): M = H_n where it can be built, else H_d (x) Q_{n/d}; s random signs.
    Orthogonal (R R^T = I), float64, the same for the same (n, seed)."""
    g = torch.Generator().manual_seed(seed)
    d = largest_order(n)
    M = hadamard(d) / d ** 0.5
    if d < n:
        M = torch.kron(M.contiguous(), random_orthogonal(n // d, g).contiguous())
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return signs[:, None] * M
