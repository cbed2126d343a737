"""Nucleus (top-p) sampling that looks at a few hundred candidates per row instead of the whole vocabulary.

transformers' own top-p sorts every row of the (batch, vocab) logits at each step and then draws with
``torch.multinomial`` over the whole vocabulary. On a CPU with a 49k-token vocabulary and a batch of 128,
that sort alone costs more than the model's forward pass for one token (docs/benchmarks.md).

:class:`NucleusSampler` draws from the same distribution with less work. The nucleus of a row is the
smallest set of most likely tokens whose probability reaches ``top_p`` (Holtzman et al. 2020, "The
Curious Case of Neural Text Degeneration", section 3.1): token ``v`` is kept when the probability of the
tokens ranked above it is below ``top_p``. Ranking only the ``candidates`` most likely tokens
(``torch.topk``) finds that set exactly whenever their total probability reaches ``top_p``; rows where
it does not are ranked among 8 times as many, and the rest sorted in full. The token is drawn from the
kept probabilities renormalised, with the sampler's own ``torch.Generator``.

Used as a transformers ``LogitsProcessor`` under greedy decoding: it returns scores that are 0 at the
drawn token and ``-inf`` elsewhere, so ``generate``'s argmax picks the drawn token.
"""

from __future__ import annotations

import torch


def nucleus_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which of a row's tokens, listed most likely first, are in its nucleus.

    Args:
        probs: (B, K) probabilities sorted in descending order along the last dim (a prefix of the
            row's full sorted distribution, K ≤ vocabulary size).
        top_p: nucleus mass in (0, 1].

    Returns:
        (B, K) bool: True where the mass ranked above the token is below ``top_p``. The most likely
        token is always kept.
    """
    above = torch.cumsum(probs, dim=-1) - probs
    keep = above < top_p
    keep[:, 0] = True
    return keep


class NucleusSampler:
    """A transformers logits processor that samples one token per row at ``temperature`` and ``top_p``.

    Args:
        temperature: softmax temperature (> 0).
        top_p: nucleus mass in (0, 1]; 1 samples from the whole distribution.
        generator: the ``torch.Generator`` draws come from (seed it per batch for reproducible samples),
            or a list of ``(rows, generator)`` pairs: the rows (a (R,) int64 tensor of batch rows) drawn
            with each generator, together covering every row once. A row's draws depend only on its
            own generator and the other rows of its group.
        candidates: how many most-likely tokens are ranked per row before falling back to a full sort.

    Call: ``(input_ids (B, T) int64, scores (B, V) float logits) -> (B, V) float``, 0 at the drawn
    token and ``-inf`` elsewhere. Use it with greedy decoding (``do_sample=False``).

    Raises:
        ValueError: if temperature ≤ 0 or top_p is outside (0, 1].
    """

    def __init__(self, temperature: float, top_p: float, generator, candidates: int = 256):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_p, self.generator, self.candidates = temperature, top_p, generator, candidates

    def _groups(self, logits: torch.Tensor):
        """The nucleus of every row as ``(rows (R,), token ids (R, K), kept probabilities (R, K))`` groups.

        Rows are ranked among their ``candidates`` most likely tokens first; rows whose nucleus is not
        within them among 8 times as many; the rest are sorted in full. Columns past a group's largest
        nucleus are dropped.
        """
        log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
        vocab = logits.shape[-1]
        rows = torch.arange(logits.shape[0], device=logits.device)
        groups = []
        for k in (self.candidates, 8 * self.candidates, vocab):
            sub, norm = (logits, log_norm) if len(rows) == len(logits) else (logits[rows], log_norm[rows])
            if k < vocab:
                top, idx = torch.topk(sub, k, dim=-1)
            else:
                top, idx = torch.sort(sub, dim=-1, descending=True)
            probs = torch.exp(top - norm)
            covered = probs.sum(-1) >= self.top_p if k < vocab else torch.ones_like(rows, dtype=torch.bool)
            if bool(covered.any()):
                probs = probs[covered]
                probs = probs * nucleus_mask(probs, self.top_p)
                width = int((probs > 0).sum(-1).max())
                groups.append((rows[covered], idx[covered][:, :width], probs[:, :width]))
            rows = rows[~covered]
            if not len(rows) or k >= vocab:
                break
        return groups

    def kept(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, V) logits -> (B, V) bool: the tokens each row may draw."""
        if self.top_p >= 1.0:
            return torch.ones_like(scores, dtype=torch.bool)
        out = torch.zeros_like(scores, dtype=torch.bool)
        for rows, idx, probs in self._groups(scores.float() / self.temperature):
            out[rows.unsqueeze(-1), idx] = probs > 0
        return out

    def draw(self, scores: torch.Tensor) -> torch.Tensor:
        """One token id per row: (B, V) logits -> (B,) int64."""
        logits = scores.float() / self.temperature
        if isinstance(self.generator, torch.Generator):
            return self._draw(logits, self.generator)
        out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        for rows, generator in self.generator:
            out[rows] = self._draw(logits[rows], generator)
        return out

    def _draw(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.top_p >= 1.0:
            return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
        out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        for rows, idx, probs in self._groups(logits):
            out[rows] = idx.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(-1)
        return out

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        tokens = self.draw(scores)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, tokens.unsqueeze(-1), 0.0)
        return out
