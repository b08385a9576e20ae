"""Model Stock: interpolate from the base towards the average fine-tune by t = N cos / (1 + (N - 1) cos), where
cos is the mean pairwise cosine of the task vectors (whole tensor, or per row with `filter_wise`), as mergekit.

The ratio t depends only on the inputs and is cached. Pure function.
"""

from __future__ import annotations

import torch

from merge_core.methods.base import TensorInputs, merge_method


def stock_ratio(deltas: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """t per row (filter_wise) or for the whole tensor, shaped to broadcast against a delta."""
    if filter_wise:
        vectors = [d.unsqueeze(0) if d.dim() == 1 else d for d in deltas]
    else:
        vectors = [d.reshape(-1) for d in deltas]
    cosines = []
    for i, a in enumerate(vectors):
        for b in vectors[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(deltas)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6          # no finite estimate: keep the base there
    ratio = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    if not filter_wise:
        return ratio.reshape(())
    return ratio.reshape(-1) if deltas[0].dim() == 1 else ratio


@merge_method("model_stock", reference="https://arxiv.org/abs/2403.19522", base="required", models=(3, None),
              delta_based=True)
def model_stock(inputs: TensorInputs, *, filter_wise: bool = False) -> torch.Tensor:
    """base + t · mean_i(delta_i)  (= t · average + (1 - t) · base)."""
    deltas = inputs.deltas
    ratio = inputs.cached(f"stock_ratio/{filter_wise}", lambda: stock_ratio(deltas, filter_wise)) / len(deltas)
    out = deltas[0].clone()
    for d in deltas[1:]:
        out.add_(d)
    return out.mul_(ratio).add_(inputs.base)
