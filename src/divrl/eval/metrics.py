"""Aggregation of per-sample scores as torchmetrics ``Metric`` objects (stateful, synchronised across processes).

- :class:`ConsistencyDiversity` — the paper's trade-off point of a method: the **consistency ratio** (share of
  samples whose identity score is above the threshold) and the **diversity over consistency** (mean nSSM over those
  samples). Update it group by group, on any number of ranks; ``compute`` gathers every sample.
- :func:`summarize` — the whole evaluation of one method: every column's mean (NaN-aware: a category a metric leaves
  out does not count), overall and per category, plus the trade-off point, from the per-sample rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.aggregation import MeanMetric
from torchmetrics.utilities import dim_zero_cat

from divrl.eval.functional import consistency_ratio, diversity_over_consistency

__all__ = ["ConsistencyDiversity", "summarize"]


class ConsistencyDiversity(Metric):
    """Consistency ratio and diversity over consistency of a set of samples.

    Args:
        threshold: identity score above which a sample counts as consistent (the paper: VSM > 0.6 in domain,
            sDINO > 0.75 out of domain).

    ``update(identity, diversity)`` takes one value per sample (NaN identity = not covered, left out);
    ``compute()`` returns ``{"consistency_ratio", "diversity_over_consistency", "consistent", "samples"}`` as
    tensors (NaN where undefined, see :mod:`divrl.eval.functional`).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, threshold: float, **kwargs):
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self.add_state("identity", default=[], dist_reduce_fx="cat")
        self.add_state("diversity", default=[], dist_reduce_fx="cat")

    def update(self, identity: Tensor, diversity: Tensor) -> None:
        identity = torch.as_tensor(identity, dtype=torch.float32, device=self.device).flatten()
        diversity = torch.as_tensor(diversity, dtype=torch.float32, device=self.device).flatten()
        if identity.shape != diversity.shape:
            raise ValueError(
                f"ConsistencyDiversity: {identity.numel()} identity vs {diversity.numel()} diversity scores"
            )
        self.identity.append(identity)
        self.diversity.append(diversity)

    def compute(self) -> dict[str, Tensor]:
        identity, diversity = _cat(self.identity), _cat(self.diversity)  # after a sync: one tensor, not a list
        covered = ~identity.isnan()
        return {
            "consistency_ratio": consistency_ratio(identity, self.threshold),
            "diversity_over_consistency": diversity_over_consistency(diversity, identity, self.threshold),
            "consistent": (identity[covered] > self.threshold).sum(),
            "samples": covered.sum(),
        }


def _cat(state: list[Tensor] | Tensor) -> Tensor:
    if isinstance(state, Tensor):
        return state.flatten()
    return dim_zero_cat(state) if len(state) else torch.zeros(0)


def summarize(
    rows: Iterable[Mapping],
    columns: Sequence[str],
    *,
    identity: str,
    diversity: str,
    threshold: float,
) -> dict:
    """Means of ``columns`` over per-sample ``rows`` (dicts with the column values and a ``category``), overall and
    per category, and the trade-off point from the ``identity`` and ``diversity`` columns.

    Returns:
        ``{"overall": {...}, "by_category": {category: {...}}}`` where each ``{...}`` maps every column to its mean
        (``None`` when no sample has a value), ``<column>_n`` to the number of samples with a value, ``samples`` to
        the row count, plus ``consistency_ratio``, ``diversity_over_consistency`` and ``consistent``.
    """
    rows = list(rows)
    groups: dict[str | None, list[Mapping]] = {None: rows}
    for row in rows:
        groups.setdefault(row.get("category") or "none", []).append(row)
    result = {name: _summary(part, columns, identity, diversity, threshold) for name, part in groups.items()}
    overall = result.pop(None)
    return {"overall": overall, "by_category": dict(sorted(result.items()))}


def _summary(rows: list[Mapping], columns: Sequence[str], identity: str, diversity: str, threshold: float) -> dict:
    out: dict = {"samples": len(rows)}
    for column in columns:
        values = torch.tensor([_value(row.get(column)) for row in rows], dtype=torch.float64)
        count = int((~values.isnan()).sum())
        # a NaN is a sample the metric does not cover; the rows are already all here: never sync across processes
        mean = MeanMetric(nan_strategy="ignore", sync_on_compute=False)
        if count:
            mean.update(values)
        out[column] = float(mean.compute()) if count else None
        out[f"{column}_n"] = count
    point = {
        "consistency_ratio": torch.tensor(float("nan")),
        "diversity_over_consistency": torch.tensor(float("nan")),
        "consistent": torch.tensor(0),
    }
    if rows:
        trade_off = ConsistencyDiversity(threshold, sync_on_compute=False)
        trade_off.update([_value(row.get(identity)) for row in rows], [_value(row.get(diversity)) for row in rows])
        point = trade_off.compute()
    out["consistency_ratio"] = _number(point["consistency_ratio"])
    out["diversity_over_consistency"] = _number(point["diversity_over_consistency"])
    out["consistent"] = int(point["consistent"])
    return out


def _value(value) -> float:
    return float("nan") if value is None else float(value)


def _number(value: Tensor) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value
