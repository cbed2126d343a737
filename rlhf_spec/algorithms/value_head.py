"""Per-token value estimates V(s_t) for PPO: a value head on the policy's backbone, or a separate critic.

Two critics, as PPO implementations for language models build them:

* :class:`ValueHead`: one linear layer ``H -> 1`` on the policy's last hidden state (the backbone is
  shared with the policy, so the value loss also shapes the policy's features). Its weights start
  small (normal with standard deviation ``1 / (H + 1)``, bias 0), so the first value estimates are
  near 0 and the first advantages are close to the raw returns.
* a separate critic: a sequence-classification model (a trained reward model, or a policy loaded
  with a fresh scalar head) whose score head is applied to *every* position's last hidden state
  instead of only the last one (:func:`critic_token_values`). It must read the policy's token ids,
  so it must use the policy's tokenizer.

Alignment: the value of the state before response token ``t`` is read at position ``t - 1`` (the
position whose hidden state also predicts token ``t``), see :func:`response_positions`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

__all__ = ["ValueHead", "critic_token_values", "ActorCritic", "response_positions", "gather_response"]


class ValueHead(nn.Module):
    """``V(h) = w . h + b`` per position: (B, T, H) hidden states -> (B, T) values (reward units).

    Args:
        hidden_size: the backbone's hidden size H.
        seed: seeds the initial weights (normal, std ``1 / (H + 1)``), so a fresh head does not depend
            on the process's global random state.
    """

    def __init__(self, hidden_size: int, seed: int = 0):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.summary = nn.Linear(self.hidden_size, 1)
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            self.summary.weight.copy_(torch.randn(self.summary.weight.shape, generator=g) / (self.hidden_size + 1))
            self.summary.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


def _head_of(critic) -> nn.Module:
    """The score head of a sequence-classification model (``score`` for decoder models, ``classifier`` for BERT-likes).

    Raises:
        ValueError: if it has neither.
    """
    for name in ("score", "classifier"):
        head = getattr(critic, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"critic {type(critic).__name__} has no 'score' or 'classifier' head to apply per token")


def critic_token_values(critic, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-position values of a sequence-classification critic: its score head on every position's
    last hidden state (BERT-likes: through the pooler's dense layer and activation first, as their
    head expects pooled input). Returns (B, T), the first output of the head."""
    base = getattr(critic, critic.base_model_prefix)
    out = base(input_ids=input_ids, attention_mask=attention_mask)
    hidden = out.last_hidden_state
    pooler = getattr(base, "pooler", None)
    if pooler is not None and hasattr(pooler, "dense"):
        hidden = pooler.activation(pooler.dense(hidden))
    head = _head_of(critic)
    if isinstance(head, nn.Linear):
        values = head(hidden)
    elif hasattr(head, "dense") and hasattr(head, "out_proj"):  # RoBERTa-style head: it reads position 0 only
        values = head.out_proj(torch.tanh(head.dense(hidden)))
    else:
        raise ValueError(f"critic {type(critic).__name__}: cannot apply its head {type(head).__name__} per token")
    return values[..., 0].float()


class ActorCritic(nn.Module):
    """The policy and, for PPO, its critic in one module, so one optimizer and one accelerate
    ``prepare`` (and one checkpoint) cover both.

    Args:
        policy: a causal LM (possibly with peft adapters).
        value_head: a :class:`ValueHead` on the policy's last hidden state, or None.
        critic: a separate sequence-classification critic, or None.
    """

    def __init__(self, policy, value_head: Optional[ValueHead] = None, critic=None):
        super().__init__()
        if value_head is not None and critic is not None:
            raise ValueError("give a value head or a separate critic, not both")
        self.policy = policy
        self.value_head = value_head
        self.critic = critic

    @property
    def has_values(self) -> bool:
        return self.value_head is not None or self.critic is not None

    def forward(self, input_ids, attention_mask, values: bool = True):
        """``(logits (B, T, V), values (B, T) or None)``; values only when asked and a critic exists."""
        want = values and self.has_values
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                          output_hidden_states=bool(want and self.value_head is not None))
        v = None
        if want and self.value_head is not None:
            v = self.value_head(out.hidden_states[-1]).float()
        elif want:
            v = critic_token_values(self.critic, input_ids, attention_mask)
        return out.logits, v


def response_positions(prompt_lens: list[int], resp_lens: list[int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the response tokens in right-padded ``prompt + response`` rows.

    Returns:
        ``(pos (B, L), mask (B, L) bool)`` with L the longest response: ``pos[b, j] = prompt_lens[b] + j``
        where ``j < resp_lens[b]`` (``mask`` set), else ``prompt_lens[b]`` (a valid filler index).
    """
    p = torch.tensor(prompt_lens, dtype=torch.long, device=device)
    r = torch.tensor(resp_lens, dtype=torch.long, device=device)
    j = torch.arange(int(r.max()), dtype=torch.long, device=device)
    mask = j[None, :] < r[:, None]
    pos = torch.where(mask, p[:, None] + j[None, :], p[:, None].expand(-1, j.numel()))
    return pos, mask


def gather_response(logits: torch.Tensor, input_ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                    temperature: float, entropy: bool = False, values: Optional[torch.Tensor] = None):
    """Per-response-token logprobs (and entropies, values) in the (B, L) layout of :func:`response_positions`.

    The token at position ``t`` is predicted by the logits at ``t - 1``, divided by ``temperature + 1e-7``
    (the convention of :func:`rlhf_spec.algorithms.ops.gather_logprobs`); ``values`` (B, T) are read at
    ``t - 1`` too. Entries outside ``mask`` are 0.

    Returns:
        ``(logprobs, entropy or None, values or None)``, each (B, L) float32 (float64 for float64 logits).
    """
    from .ops import _TEMPERATURE_EPS, _compute_dtype

    prev = pos - 1
    V = logits.shape[-1]
    sel = logits.gather(1, prev.unsqueeze(-1).expand(-1, -1, V)).to(_compute_dtype(logits.dtype))
    z = sel / (temperature + _TEMPERATURE_EPS)
    lse = torch.logsumexp(z, dim=-1)
    tokens = input_ids.gather(1, pos)
    lp = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    zero = torch.zeros_like(lp)
    lp = torch.where(mask, lp, zero)
    ent = None
    if entropy:
        probs = torch.softmax(z, dim=-1)
        ent = torch.where(mask, lse - (probs * z).sum(-1), zero)
    val = None
    if values is not None:
        val = torch.where(mask, values.gather(1, prev).to(lp.dtype), zero)
    return lp, ent, val
