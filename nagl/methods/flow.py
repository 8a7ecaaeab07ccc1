"""A conditional normalizing flow of affine coupling blocks, in plain torch (ResAD's estimator).

One block on ``x`` of width ``C`` with a condition ``c`` of width ``P``
(``../shared/spec/resad-method.md``, step 4; the form of FrEIA 0.2's ``AllInOneBlock``
with ``affine_clamping``, ``SOFTPLUS`` global scale and a soft permutation, which the
tests check against FrEIA itself):

- split ``x1`` (the first ``C - C // 2`` channels) and ``x2`` (the last ``C // 2``);
- ``a = 0.1 * s([x1, c])`` with ``s`` = Linear(C1+P, 2(C1+P)) -> ReLU -> Linear(2(C1+P), 2 C2);
- ``u = clamp * tanh(a_1)``; ``x2 <- x2 * exp(u) + a_2``;
- ``x <- x * gamma + beta`` with ``gamma = 0.2 * log(1 + exp(0.5 g))`` (``g`` starts where
  ``gamma = 1``; ``beta`` starts at 0);
- ``x <- Q x`` with ``Q`` a fixed orthogonal ``C x C`` matrix drawn from a seed and kept in
  the module's state (a buffer), so a checkpoint restores exactly the rotation it was trained with.

``log det = sum(u) + sum(log gamma)`` per vector.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_position_code(grid: tuple[int, int], width: int = 256) -> torch.Tensor:
    """Fixed 2-D sin-cos code ``(h*w, width)`` in raster (row-major) order.

    The first half of the channels encodes the column, the second half the row; within
    each half sin and cos alternate, at frequencies ``10000^(-2j / (width / 2))``.
    """
    if width % 4:
        raise ValueError(f"the position code width must be a multiple of 4, got {width}")
    h, w = grid
    half = width // 2
    freq = 10000.0 ** (-2.0 * torch.arange(half // 2, dtype=torch.float64) / half)

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.double()[:, None] * freq[None]
        return torch.stack([angles.sin(), angles.cos()], dim=2).reshape(len(positions), half)

    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def random_rotation(width: int, generator: torch.Generator) -> torch.Tensor:
    """An orthogonal ``width x width`` matrix, uniform (Haar) over O(n): QR of a Gaussian
    matrix with the signs of R's diagonal moved into Q."""
    gaussian = torch.randn(width, width, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))[None]).float()


class CouplingBlock(nn.Module):
    """One conditional affine coupling block with global affine scaling and a fixed rotation.

    The condition enters the subnet's first layer linearly, so its share ``W_c c + b`` is
    computed once per distinct position (and, without autograd in eval mode, kept until the
    weights change) instead of once per vector: the same numbers, far fewer products.
    """

    def __init__(self, width: int, condition: int, clamp: float, rotation: torch.Tensor):
        super().__init__()
        if width < 2:
            raise ValueError(f"a coupling block needs at least 2 channels, got {width}")
        self.width, self.clamp = width, float(clamp)
        self.split = (width - width // 2, width // 2)
        inner = self.split[0] + condition
        self.subnet = nn.Sequential(nn.Linear(inner, 2 * inner), nn.ReLU(), nn.Linear(2 * inner, 2 * self.split[1]))
        # 0.1 * softplus_{beta=0.5}(g) = 0.2 * log(1 + exp(0.5 g)) equals 1 at g = 2 log(e^5 - 1)
        self.global_scale = nn.Parameter(torch.full((width,), 2.0 * math.log(math.expm1(5.0))))
        self.global_offset = nn.Parameter(torch.zeros(width))
        self.register_buffer("rotation", rotation.clone())
        self._cache: tuple[torch.Tensor, tuple[int, ...], torch.Tensor] | None = None

    def gamma(self) -> torch.Tensor:
        return 0.1 * F.softplus(self.global_scale, beta=0.5)

    def _table(self, code: torch.Tensor) -> torch.Tensor:
        """``W_c code + b`` for every row of ``code``; cached in eval mode without autograd."""
        first = self.subnet[0]
        if torch.is_grad_enabled() or self.training:
            return F.linear(code, first.weight[:, self.split[0]:], first.bias)
        # the cache holds ``code`` itself, so an equal key can only mean the same tensor
        key = (first.weight.data_ptr(), first.weight._version, first.bias.data_ptr(), first.bias._version)
        if self._cache is None or self._cache[0] is not code or self._cache[1] != key:
            self._cache = (code, key, F.linear(code, first.weight[:, self.split[0]:], first.bias))
        return self._cache[2]

    def _coefficients(self, x1: torch.Tensor, code: torch.Tensor,
                      positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.subnet[0]
        hidden = F.linear(x1, first.weight[:, : self.split[0]])
        if positions is None:  # whole maps: the vectors are the grid's positions in order, map after map
            hidden = (hidden.view(-1, code.shape[0], hidden.shape[1]) + self._table(code)).view(hidden.shape)
        elif torch.is_grad_enabled() or self.training:
            unique, inverse = positions.unique(return_inverse=True)
            hidden = hidden + self._table(code[unique])[inverse]
        else:
            hidden = hidden + self._table(code)[positions]
        a = 0.1 * self.subnet[2](F.relu(hidden))
        return self.clamp * torch.tanh(a[:, : self.split[1]]), a[:, self.split[1]:]

    def forward(self, x: torch.Tensor, code: torch.Tensor,
                positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, log det)`` of ``x`` ``(N, C)``; vector ``i`` is conditioned on ``code[positions[i]]``
        (``positions`` None: on ``code[i % G]``, for whole maps of ``G = len(code)`` positions)."""
        x1, x2 = x.split(self.split, dim=1)
        u, shift = self._coefficients(x1, code, positions)
        x = torch.cat([x1, x2 * torch.exp(u) + shift], dim=1)
        gamma = self.gamma()
        z = (x * gamma + self.global_offset) @ self.rotation.T
        return z, u.sum(dim=1) + torch.log(gamma).sum()

    def inverse(self, z: torch.Tensor, code: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        x = (z @ self.rotation - self.global_offset) / self.gamma()
        x1, x2 = x.split(self.split, dim=1)
        u, shift = self._coefficients(x1, code, positions)
        return torch.cat([x1, (x2 - shift) * torch.exp(-u)], dim=1)


class ConditionalFlow(nn.Module):
    """``blocks`` coupling blocks; the rotations come from ``seed`` (one generator, block after block).

    The condition of vector ``i`` is row ``positions[i]`` of ``code`` ``(G, P)`` (the position
    code of a grid), or row ``i % G`` with ``positions = None`` (whole maps, map after map); a
    per-vector condition ``(N, P)`` is ``code`` with ``positions = arange(N)``.
    """

    def __init__(self, width: int, condition: int = 256, blocks: int = 10, clamp: float = 1.9, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(int(seed))
        self.blocks = nn.ModuleList(CouplingBlock(width, condition, clamp, random_rotation(width, generator))
                                    for _ in range(blocks))

    def forward(self, x: torch.Tensor, code: torch.Tensor,
                positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z (N, C), log det (N,))``."""
        log_det = x.new_zeros(x.shape[0])
        for block in self.blocks:
            x, part = block(x, code, positions)
            log_det = log_det + part
        return x, log_det

    def inverse(self, z: torch.Tensor, code: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        for block in reversed(self.blocks):
            z = block.inverse(z, code, positions)
        return z

    def log_likelihood(self, x: torch.Tensor, code: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Per-dimension log-likelihood under a standard normal base,
        ``(-C/2 log 2 pi - |z|^2 / 2 + log det) / C``, ``(N,)``."""
        z, log_det = self(x, code, positions)
        width = x.shape[1]
        return (-0.5 * width * math.log(2 * math.pi) - 0.5 * (z ** 2).sum(dim=1) + log_det) / width
