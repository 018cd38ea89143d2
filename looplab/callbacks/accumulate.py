"""GradientAccumulation: step every `n_steps` micro-batches, as if they were one batch."""
from __future__ import annotations

import contextlib
import warnings

from ..callback import Callback, CancelBatch
from ..checks import check_int
from .distributed import skip_gradient_sync
from .order import Order

__all__ = ["GradientAccumulation"]


class GradientAccumulation(Callback):
    """The optimizer steps once per window of `n_steps` training micro-batches; the gradients add up in between.

    Each micro-batch's loss is divided by its window's size before backward, so for a mean-reduced loss over
    equal-sized micro-batches the step equals the one for their concatenated batch. The Recorder keeps the true
    (undivided) loss: it records it in `after_loss`, before this callback divides it in `before_backward`.

    Windows are counted from the start of each epoch (`learn.iter`), so they need no state of their own. The last
    window of an epoch may be shorter: it still steps at the end of the epoch, divided by its own size (so an
    epoch's gradients never leak into the next epoch or into validation). For a loader without a length the end
    cannot be foreseen: a final partial window is dropped (its gradients zeroed) with a warning.
    Micro-batches that do not step raise `CancelBatch` in `after_backward`, which skips the step and `zero_grad`;
    callbacks with a higher `order` see neither their `after_backward` nor their step events for those batches.

    Under torch's DDP, the micro-batches before a window's last run (forward and backward) under DDP's `no_sync`:
    gradients are all-reduced once per optimizer step (one call per DDP bucket), not once per micro-batch. FSDP
    reduce-scatters every micro-batch's gradients into their shards, which keeps its memory per rank low.
    """
    order = Order.ACCUMULATE

    def __init__(self, n_steps: int):
        self.n_steps = check_int("n_steps", n_steps, 1)
        self._no_sync = contextlib.ExitStack()  # entered for a micro-batch that does not step

    def before_train(self):
        self._pending = False  # gradients accumulated that no step has used yet

    def before_batch(self):
        if self.learn.training and not self._window()[1]:
            self._no_sync.enter_context(skip_gradient_sync(self.learn.model))

    def _window(self) -> tuple[int, bool]:
        """The size of the current micro-batch's window, and whether the window steps after it."""
        learn, n = self.learn, self.n_steps
        start = learn.iter - learn.iter % n
        size = n if learn.n_iter is None else min(n, learn.n_iter - start)
        return size, learn.iter == start + size - 1

    def before_backward(self):
        self.learn.loss = self.learn.loss / self._window()[0]

    def after_backward(self):
        # also after a CancelBackward (whoever raised it, before or after this callback's before_backward)
        self._no_sync.close()
        self._pending = not self._window()[1]
        if self._pending:
            raise CancelBatch  # keep the gradients: no step, no zero_grad

    def after_batch(self):
        self._no_sync.close()  # a batch cancelled before its backward

    def after_fit(self):
        self._no_sync.close()  # a fit that raised mid-batch: the user's DDP wrapper syncs again

    def after_train(self):
        if self._pending:  # an unsized loader ended mid-window, or the phase was cancelled
            if self.learn.n_iter is None:
                warnings.warn(f"GradientAccumulation({self.n_steps}): the training data ended in the middle of a "
                              f"window; its accumulated gradients were dropped", stacklevel=2)
            self.learn.opt.zero_grad()
            self._pending = False
