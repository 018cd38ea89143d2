"""Where each built-in callback runs relative to the others: the one table of positions, with the reason for each.

A callback's `order` sorts its handlers for every event (lower first; ties keep the order callbacks were given
in). A user's callback has order 0 unless it says otherwise, so it sees the batch before mixing, scaling and
recording, and after the schedule set this step's hyper-parameters only if it asks for an order above 10.

    position          order  why there
    DISTRIBUTED        -100  before_fit: the process group and device exist before anyone asks is_main_process()
                             or learn.device; after_loss: the global loss before the Recorder records it.
                             FSDP too: it shards the model and rebuilds learn.opt before anyone (GradientClip,
                             EMA's step hook, Resume) takes hold of them
    COMPILE             -90  compiles the model after DDP wrapped it, before anything calls it
    ACTIVATION_CKPT       0  wraps submodules in before_fit, before EMA (10) copies the model
    SCHEDULE             10  sets this batch's hyper-parameters before anything reads them
    ACCUMULATE           10  cancels non-stepping micro-batches in after_backward, before clipping / unscaling
    EMA                  10  updates the average in after_batch before the Recorder, trackers and checkpoints look
    CLIP                 20  clips in before_step the gradients MixedPrecision unscaled in after_backward, before
                             MixedPrecision (30) decides whether the step is skipped
    PRECISION            30  after accumulation and clipping; before the Recorder (its loss_scale series)
    MIX                  40  MixUp / CutMix replace the loss in after_loss before it is checked and recorded
    TERMINATE_ON_NAN     45  checks the final (mixed) loss before the Recorder records it
    RECORDER             50  records the loss after everything that replaces it; writes the history row
    TRACKERS             55  EarlyStopping / SaveBest / ReduceLROnPlateau counters read the row the Recorder
                             wrote; the LR finder reads the recorded loss
    PROGRESS             60  ProgressBar / ShowGraph show what the Recorder holds (its new history row too)
    PREDICTIONS          65  PredictionHistogram / SamplePredictions read the validation batches after
                             MixedPrecision cast them back, and publish before the loggers write
    TENSORBOARD          70  writes what the Recorder flushed
    LOGGERS              75  CSVLogger / MLflowLogger write what the Recorder and the prediction callbacks hold
    SWA                  90  overrides any schedule's lr; averages after the epoch's training
    CHECKPOINT           95  saves after everything above updated its state for the step / epoch
    EARLY_STOPPING      100  stops in after_epoch after logging and checkpointing saw the epoch
    PRUNE               100  a sweep's pruner stops a hopeless trial after logging and checkpointing saw the epoch
    GATHER              100  get_preds collects predictions after every callback changed them
    RESUME            10000  loads the checkpoint after every other callback's before_fit reset itself
"""
from __future__ import annotations

__all__ = ["Order"]


class Order:
    """The positions in the table above, by name (`order = Order.PRECISION`)."""
    DISTRIBUTED = -100
    COMPILE = -90
    ACTIVATION_CKPT = 0
    SCHEDULE = 10
    ACCUMULATE = 10
    EMA = 10
    CLIP = 20
    PRECISION = 30
    MIX = 40
    TERMINATE_ON_NAN = 45
    RECORDER = 50
    TRACKERS = 55
    PROGRESS = 60
    PREDICTIONS = 65
    TENSORBOARD = 70
    LOGGERS = 75
    SWA = 90
    CHECKPOINT = 95
    EARLY_STOPPING = 100
    PRUNE = 100
    GATHER = 100
    RESUME = 10_000
