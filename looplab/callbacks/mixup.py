"""MixUp and CutMix: train on convex combinations of pairs of samples and of their losses.

Both draw λ ~ Beta(α, α) and the pairing permutation from torch's global CPU RNG, so a run is reproducible from
its seed and resumes exactly when the RNG state is restored. Only training batches are touched.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..callback import Callback
from ..checks import check_number
from ..util import rebuilt
from .order import Order

__all__ = ["MixUp", "CutMix"]


def _permute(yb, perm: torch.Tensor):
    """The targets in the order of the shuffled copy: a tensor, or each tensor of a tuple / list."""
    if isinstance(yb, torch.Tensor):
        return yb[perm]
    if isinstance(yb, (tuple, list)):
        return type(yb)(_permute(y, perm) for y in yb)
    raise TypeError(f"MixUp/CutMix need targets that are tensors (or tuples of them), got {type(yb).__name__}")


class _Mix(Callback):
    """Shared by MixUp and CutMix: `before_batch` mixes the inputs, `after_loss` mixes the loss.

    The input mixed is the batch's tensor `x`, the first of several (or `xb[key]`), or `xb[key]` of a mapping batch
    (`key=` is then required, e.g. "pixel_values"). A `loss_func` is required (checked when the fit starts).

    The loss becomes `λ·loss_func(pred, y_a) + (1−λ)·loss_func(pred, y_b)` with the Learner's own `loss_func`, so any
    loss works (no one-hot targets). The loop has already computed `loss_func(pred, y_a)` as `learn.loss`; only the
    `y_b` term is new. Order 40: before the Recorder (50), which records the mixed loss.
    """
    order = Order.MIX

    def __init__(self, alpha: float, key: str | int | None = None):
        self.alpha, self.key = check_number("alpha", alpha, 0, low_open=True), key
        a = torch.tensor(self.alpha, dtype=torch.float64)
        self._beta = torch.distributions.Beta(a, a)  # built once: construction validates its arguments
        self.lam: float | None = None  # the λ of the current training batch (for inspection and tests)

    def _draw_lambda(self) -> float:
        # Beta samples come from torch's gamma sampler, which draws from torch's global CPU generator.
        return float(self._beta.sample())

    def _mix(self, x: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, float]:
        raise NotImplementedError

    def before_fit(self):
        if self.learn.loss_func is None:
            raise ValueError(f"{self.name} needs a loss_func: it mixes the losses of two target sets computed with "
                             f"it, and loss_func=None (the model's own loss) cannot be recomputed for the second")

    def before_batch(self):
        learn = self.learn
        if not learn.training:
            return
        xb, key = learn.xb, self.key
        if isinstance(xb, Mapping):
            if key not in xb:
                raise TypeError(f"{self.name}: the batches are mappings (keys {sorted(xb)}); pass key= naming the "
                                f"floating-point input to mix, got key={key!r}")
        elif isinstance(xb, tuple):  # several inputs: mix the first, or the one at index `key`
            key = 0 if key is None else key
            if isinstance(key, bool) or not isinstance(key, int) or not -len(xb) <= key < len(xb):
                raise TypeError(f"{self.name}: the batches hold {len(xb)} inputs; key= must be an index among them, "
                                f"got key={key!r}")
            key %= len(xb)
        elif key is not None:
            raise TypeError(f"{self.name}(key={key!r}) needs mapping or tuple inputs, got a {type(xb).__name__}")
        x = xb if key is None else xb[key]
        if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
            raise TypeError(f"{self.name} mixes a floating-point tensor input, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        perm = torch.randperm(x.shape[0]).to(x.device, non_blocking=True)  # CPU RNG: same on every device
        mixed, self.lam = self._mix(x, perm)
        if key is None:
            learn.xb = mixed
        elif isinstance(xb, tuple):
            learn.xb = (*xb[:key], mixed, *xb[key + 1:])
        else:
            learn.xb = rebuilt(xb, {**xb, key: mixed})  # a BatchEncoding stays one
        self._y_b = _permute(learn.yb, perm)

    def after_loss(self):
        learn = self.learn
        if not learn.training:
            return
        lam = self.lam
        learn.loss = lam * learn.loss + (1 - lam) * learn.loss_func(learn.pred, self._y_b)

    def after_batch(self):
        self._y_b = None  # do not keep the batch's targets alive


class MixUp(_Mix):
    """MixUp (Zhang et al. 2018): inputs `λ·x + (1−λ)·x[perm]`, λ ~ Beta(α, α); losses mixed with the same λ."""

    def __init__(self, alpha: float = 0.4, key: str | int | None = None):
        super().__init__(alpha, key)

    def _mix(self, x, perm):
        lam = self._draw_lambda()
        return torch.lerp(x[perm], x, lam), lam  # x[perm] + λ·(x − x[perm]) = λ·x + (1−λ)·x[perm]


def cutmix_box(height: int, width: int, lam: float, cy: int, cx: int) -> tuple[int, int, int, int]:
    """The CutMix box `(y1, y2, x1, x2)`: sides `√(1−λ)` of the image's, centred on (cy, cx), clipped to the image."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y1, y2, x1, x2


class CutMix(_Mix):
    """CutMix (Yun et al. 2019): paste a box of `x[perm]` into `x` (inputs `(N, C, H, W)`).

    λ is drawn from Beta(α, α) to size the box, then set to the true fraction of each image left unpasted
    (the box is clipped at the borders), so the loss weights match the pixels.
    """

    def __init__(self, alpha: float = 1.0, key: str | int | None = None):
        super().__init__(alpha, key)

    def _mix(self, x, perm):
        if x.ndim != 4:
            raise ValueError(f"CutMix needs image batches of shape (N, C, H, W), got inputs of shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        lam = self._draw_lambda()
        cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))  # the box centre
        y1, y2, x1, x2 = cutmix_box(height, width, lam, cy, cx)
        mixed = x.clone()
        mixed[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
        return mixed, 1.0 - (y2 - y1) * (x2 - x1) / (height * width)
