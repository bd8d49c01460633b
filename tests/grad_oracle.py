"""The gradient oracle of the tests: torch autograd of the dense-mask formula (spec §4).

Independent of every backward in the package: it builds each pattern's mask with
:func:`ringsim.reference.pattern_mask`, mixes the patterns with weights that are *not*
detached (pitfall 14), and lets autograd differentiate.
"""

from __future__ import annotations

import numpy as np
import pytest

from ringsim.cases import Case
from ringsim.config import make_config
from ringsim.reference import pattern_mask


def torch_gradients(case: Case, q, k, v, dout, dlse, key_padding=None) -> tuple[np.ndarray, ...]:
    """out, lse and dq, dk, dv of ``<dout, out> + <dlse, lse>`` by torch autograd of spec §4.

    Per head and pattern a masked softmax gives ``(o_i, lse_i)``; the patterns mix with
    ``w_i = exp(lse_i - L)``, not detached. Rows with no key softmax over zeros and are then
    replaced by ``(0, -inf)``, so autograd sees no ``-inf - -inf`` and gives 0, not NaN.
    """
    torch = pytest.importorskip("torch", reason="the autograd oracle needs torch")
    config = make_config(case.segment_lengths, case.dilation_rates, **case.kwargs())
    tq, tk, tv = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    n, inf = case.seq_len, float("inf")
    ratio = case.num_heads // k.shape[2]  # query heads per K/V head (grouped-query)
    scale = config.scale(case.head_dim)
    outs, lses = [], []
    for head, patterns in enumerate(config.head_patterns(case.num_heads)):
        scores = scale * torch.einsum("bxd,byd->bxy", tq[:, :, head], tk[:, :, head // ratio])
        parts, has_keys = [], []
        for pattern in patterns:
            mask = torch.from_numpy(pattern_mask(pattern, n, is_causal=case.is_causal))
            if key_padding is not None:  # (b, n, n): a padded key is never attended
                mask = mask & ~torch.from_numpy(key_padding)[:, None, :]
            has_key = mask.any(-1)  # (n,), or (b, n) with a key padding mask
            safe = torch.where(mask, scores, torch.where(has_key[..., None], -inf, 0.0))
            o_i = torch.softmax(safe, -1) @ tv[:, :, head // ratio]  # (b, n, d)
            lse_i = torch.logsumexp(safe, -1)  # (b, n)
            parts.append(
                (torch.where(has_key[..., None], o_i, 0.0), torch.where(has_key, lse_i, -inf))
            )
            has_keys.append(has_key)
        any_key = torch.stack(has_keys).any(0)  # (n,)
        stacked = torch.where(any_key, torch.stack([lse_i for _, lse_i in parts]), 0.0)
        total = torch.logsumexp(stacked, 0)  # L, (b, n)
        weights = torch.exp(stacked - total)  # not detached (pitfall 14)
        out = sum(w[..., None] * o_i for w, (o_i, _) in zip(weights, parts))
        outs.append(torch.where(any_key[..., None], out, 0.0))
        lses.append(torch.where(any_key, total, -inf))
    out, lse = torch.stack(outs, 2), torch.stack(lses, 1)  # (b, n, h, d), (b, h, n)
    finite = torch.isfinite(lse)
    loss = (torch.from_numpy(dout) * out).sum()
    loss = (
        loss
        + torch.where(finite, torch.from_numpy(dlse) * torch.where(finite, lse, 0.0), 0.0).sum()
    )
    grads = torch.autograd.grad(loss, (tq, tk, tv))
    return (out.detach().numpy(), lse.detach().numpy(), *(g.numpy() for g in grads))


def dense_gradients(case: Case, q, k, v, dout, dlse=None, key_padding=None):
    """dq, dk, dv of ``<dout, out> + <dlse, lse>`` (float64) by :func:`torch_gradients`."""
    q, k, v, dout = (np.asarray(x, dtype=np.float64) for x in (q, k, v, dout))
    b, n, h, _ = q.shape
    dlse = np.zeros((b, h, n)) if dlse is None else np.asarray(dlse, dtype=np.float64)
    return torch_gradients(case, q, k, v, dout, dlse, key_padding)[2:]
