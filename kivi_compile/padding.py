"""Padded batches: keep pad tokens out of the per-channel key groups' min/max.

A key group spans G tokens of one channel, so a left-padded row's pad tokens would widen the
range of the group they share with the first real tokens. Before a prompt's keys are quantized,
each position that the attention mask hides from the last query is given the key of the nearest
visible position in its row (the next one; the previous one where none follows). Hidden positions
stay hidden for every later query (pads, and tokens a sliding window has passed), so this changes
nothing attention can see while making the groups depend on real tokens only.
"""

from __future__ import annotations

import torch


def key_validity(attn_mask: torch.Tensor) -> torch.Tensor:
    """Which key positions the last query may attend to, ``[B or 1, T]`` bool.

    ``attn_mask`` is an SDPA/eager attention mask broadcastable to ``[B, H, q, T]``: boolean
    (True = attend) or additive (a position at the dtype's minimum or -inf is masked).
    """
    last_query = attn_mask[..., -1, :]
    if last_query.dtype == torch.bool:
        visible = last_query
    else:
        visible = last_query > torch.finfo(last_query.dtype).min / 2
    while visible.dim() > 2:
        visible = visible.any(dim=1)
    return visible if visible.dim() == 2 else visible.unsqueeze(0)


def backfill_hidden_keys(keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``keys [B, H, T, D]`` with every hidden position replaced by its nearest visible one."""
    batch, heads, seq_len, head_dim = keys.shape
    visible = visible.expand(batch, seq_len).to(keys.device)
    positions = torch.arange(seq_len, device=keys.device).expand(batch, seq_len)
    beyond = torch.full_like(positions, seq_len)
    next_visible = torch.where(visible, positions, beyond).flip(-1).cummin(-1).values.flip(-1)
    previous_visible = torch.where(visible, positions, -1).cummax(-1).values
    source = torch.where(next_visible < seq_len, next_visible, previous_visible)
    source = torch.where(source >= 0, source, positions)  # a row with nothing visible stays as is
    index = source[:, None, :, None].expand(batch, heads, seq_len, head_dim)
    return keys.gather(2, index)
