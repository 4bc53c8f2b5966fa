"""The paper's one-layer IWAE written in plain PyTorch: the floor of the benchmarks."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class HandIWAE(nn.Module):
    """q 784-200-200-50 and p 50-200-200-784 Bernoulli, tanh, without Pyro.

    The encoder's last layer outputs the mean and the log standard deviation of
    q(z|x), as the library's ``GaussianLayer`` does; :meth:`load_from` copies the
    weights of the library's ``PaperModel`` and ``PaperGuide``.
    """

    def __init__(self, x_dim: int = 784, hidden: int = 200, z_dim: int = 50):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(x_dim, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, 2 * z_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(z_dim, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, x_dim),
        )

    @torch.no_grad()
    def load_from(self, model: nn.Module, guide: nn.Module) -> HandIWAE:
        """Copies the weights of the library's one-layer model and guide."""
        theirs = itertools.chain(guide.parameters(), model.parameters())
        ours = itertools.chain(self.encoder.parameters(), self.decoder.parameters())
        for mine, other in itertools.zip_longest(ours, theirs):
            if mine is None or other is None or mine.shape != other.shape:
                raise ValueError("the library's architecture differs from this one")
            mine.copy_(other)
        return self

    def decoder_flops(self, particles: int, backward: bool = True) -> int:
        """Matmul FLOPs of the decoder for ``particles``: forward and backward, or
        forward alone (``backward=False``, as in evaluation).

        Forward is 2 FLOPs per multiply-add; backward twice that (gradients of
        the weights and of each layer's input, which reparameterised z needs).
        """
        macs = sum(
            m.in_features * m.out_features
            for m in self.decoder
            if isinstance(m, nn.Linear)
        )
        return (6 if backward else 2) * macs * particles

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log standard deviation of q(z|x)."""
        loc, log_scale = self.encoder(x).chunk(2, dim=-1)
        return loc, log_scale

    def log_weights(
        self,
        x: torch.Tensor,
        k: int,
        estimator: str = "iwae",
        encoded: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``[k, batch]`` log p(x, z) - log q(z|x) of k reparameterised particles.

        With ``stl`` and ``dreg``, log q is evaluated at stopped encoder outputs;
        ``dreg`` also rescales the gradient reaching each particle by its
        normalised weight (Tucker et al. 2019), as ``pyro_iwae.IWELBO`` does.
        """
        loc, log_scale = self.encode(x) if encoded is None else encoded
        scale = log_scale.exp()
        z = loc + scale * torch.randn(
            (k,) + loc.shape, dtype=loc.dtype, device=loc.device
        )
        if estimator != "iwae":
            loc, log_scale, scale = loc.detach(), log_scale.detach(), scale.detach()
        if estimator == "dreg":
            z = z.view_as(z)  # a fresh node whose gradient is rescaled below
        log_q = (-0.5 * ((z - loc) / scale).pow(2) - log_scale - HALF_LOG_2PI).sum(-1)
        log_pz = (-0.5 * z.pow(2) - HALF_LOG_2PI).sum(-1)
        logits = self.decoder(z)
        log_px = -F.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none"
        ).sum(-1)
        log_w = log_px + log_pz - log_q
        if estimator == "dreg" and z.requires_grad:
            weights = log_w.detach().softmax(0).unsqueeze(-1)
            z.register_hook(lambda grad: grad * weights)
        return log_w

    def loss(self, x: torch.Tensor, k: int, estimator: str = "iwae") -> torch.Tensor:
        """``-mean_b L_k(x_b)``, differentiable with the given estimator."""
        log_w = self.log_weights(x, k, estimator)
        return -(log_w.logsumexp(0) - math.log(k)).mean()

    @torch.no_grad()
    def log_likelihood(
        self, x: torch.Tensor, num_samples: int, chunk_size: int
    ) -> torch.Tensor:
        """``[batch]`` estimates ``L_K(x)``, ``chunk_size`` particles at a time."""
        encoded = self.encode(x)
        total = None
        for start in range(0, num_samples, chunk_size):
            k = min(chunk_size, num_samples - start)
            chunk = self.log_weights(x, k, encoded=encoded).logsumexp(0)
            total = chunk if total is None else torch.logaddexp(total, chunk)
        return total - math.log(num_samples)


class HandIWAEDistributions(HandIWAE):
    """:class:`HandIWAE` with its log-probs from ``torch.distributions``, built as
    Pyro's plates build them (expanded to ``[k, batch]``); a diagnostic that
    separates the cost of the distribution objects from that of Pyro's tracing.
    """

    def log_weights(
        self,
        x: torch.Tensor,
        k: int,
        estimator: str = "iwae",
        encoded: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if estimator != "iwae":
            raise NotImplementedError("only the iwae estimator")
        from torch.distributions import Bernoulli, Independent, Normal

        loc, log_scale = self.encode(x) if encoded is None else encoded
        batch_shape = (k, x.shape[0])
        q = Independent(Normal(loc, log_scale.exp()), 1).expand(batch_shape)
        z = q.rsample()
        zeros = x.new_zeros(loc.shape[-1])
        prior = Independent(Normal(zeros, zeros + 1), 1).expand(batch_shape)
        likelihood = Independent(Bernoulli(logits=self.decoder(z)), 1)
        return likelihood.log_prob(x) + prior.log_prob(z) - q.log_prob(z)
