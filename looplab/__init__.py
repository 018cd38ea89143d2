"""looplab: a small, fast, explicit training loop for PyTorch, where every feature is a callback."""
from .averaging import average_checkpoints, average_last
from .callback import (Callback, CancelBackward, CancelBatch, CancelEpoch, CancelFit, CancelStep, CancelTrain,
                       CancelValidate)
from .callbacks import (EMA, FSDP, SWA, ActivationCheckpointing, Checkpoint, CutMix, EarlyStopping,
                        GradientAccumulation, GradientClip, MixedPrecision, MixUp, ParamScheduler, ProgressBar,
                        Recorder, ReduceLROnPlateau, Resume, SaveBest, TensorBoard, TerminateOnNaN)
from .callbacks.checkpoint import latest_checkpoint
from .callbacks.compile import Compile
from .callbacks.graph import ShowGraph
from .callbacks.loggers import CSVLogger, MLflowLogger
from .callbacks.predictions import PredictionHistogram, SamplePredictions
from .data import DataLoaders
from .learner import Learner
from .lr_finder import LRFinder, LRFindResult
from .metrics import AUROC, F1Score
from .optim import Lion
from .repro import get_rng_state, set_rng_state, set_seed

__version__ = "0.1.0"
__all__ = ["Learner", "Callback", "DataLoaders", "CancelBatch", "CancelStep", "CancelTrain", "CancelValidate",
           "CancelEpoch", "CancelFit", "CancelBackward",
           "Recorder", "ProgressBar", "TensorBoard", "ParamScheduler", "LRFinder", "LRFindResult", "Lion",
           "MixedPrecision", "GradientClip", "GradientAccumulation", "ActivationCheckpointing",
           "MixUp", "CutMix", "SWA", "EMA", "average_checkpoints", "average_last",
           "EarlyStopping", "SaveBest", "ReduceLROnPlateau", "TerminateOnNaN",
           "Checkpoint", "Resume", "Compile", "latest_checkpoint", "F1Score", "AUROC", "set_seed", "get_rng_state",
           "set_rng_state", "CSVLogger", "MLflowLogger", "PredictionHistogram", "SamplePredictions", "ShowGraph",
           "FSDP"]
