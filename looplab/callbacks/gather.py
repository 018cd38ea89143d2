"""GatherPreds: collects the predictions and targets of a validation phase (what `learn.get_preds` returns)."""
from __future__ import annotations

from ..callback import Callback
from ..util import detached
from .order import Order

__all__ = ["GatherPreds"]


class GatherPreds(Callback):
    """Keeps each validation batch's `pred` and `yb` (detached, structure kept) in `.preds` / `.targets`."""
    order = Order.GATHER

    def before_validate(self):
        self.preds, self.targets = [], []

    def after_loss(self):
        self.preds.append(detached(self.learn.pred))
        self.targets.append(detached(self.learn.yb))
