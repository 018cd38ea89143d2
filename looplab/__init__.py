"""looplab: a small, fast, explicit training loop for PyTorch, where every feature is a callback."""
from .callback import (Callback, CancelBackward, CancelBatch, CancelEpoch, CancelFit, CancelStep, CancelTrain,
                       CancelValidate)
from .callbacks import ProgressBar, Recorder, TensorBoard
from .data import DataLoaders
from .learner import Learner
from .callbacks.schedule import ParamScheduler
from .lr_finder import LRFinder, LRFindResult
from .optim import Lion
from .callbacks import Checkpoint, Resume
from .repro import get_rng_state, set_rng_state, set_seed
from .averaging import average_checkpoints, average_last
from .callbacks import (EMA, SWA, CutMix, EarlyStopping, MixUp, ReduceLROnPlateau, SaveBest,
                        TerminateOnNaN)

__version__ = "0.1.0"
__all__ = ["Learner", "Callback", "DataLoaders", "CancelBatch", "CancelStep", "CancelTrain", "CancelValidate",
           "CancelEpoch", "CancelFit", "CancelBackward", "Recorder", "ProgressBar", "TensorBoard"]
__all__ += ["ParamScheduler", "LRFinder", "LRFindResult", "Lion"]
__all__ += ["MixUp", "CutMix", "SWA", "EMA", "average_checkpoints", "average_last", "EarlyStopping", "SaveBest",
            "ReduceLROnPlateau", "TerminateOnNaN"]
__all__ += ["Checkpoint", "Resume", "set_seed", "get_rng_state", "set_rng_state"]
