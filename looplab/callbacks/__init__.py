"""One module per feature. Feature modules import the core's pieces (callback, util, data, the pure modules),
never `looplab.learner` at import time: the Learner imports the default callbacks from here."""
from .accumulate import GradientAccumulation
from .activation_checkpointing import ActivationCheckpointing
from .averaging import EMA, SWA
from .checkpoint import Checkpoint, Resume
from .clip import GradientClip
from .compile import Compile
from .distributed import (
           DistributedDataParallel,  # looplab's callback (wraps torch's class of that name)
)
from .fsdp import FSDP
from .graph import ShowGraph
from .loggers import CSVLogger, MLflowLogger
from .mixup import CutMix, MixUp
from .precision import MixedPrecision
from .predictions import PredictionHistogram, SamplePredictions
from .progress import ProgressBar
from .recorder import Recorder
from .schedule import ParamScheduler
from .tensorboard import TensorBoard
from .tracking import EarlyStopping, ReduceLROnPlateau, SaveBest, TerminateOnNaN

__all__ = ["ProgressBar", "Recorder", "TensorBoard", "ParamScheduler", "MixedPrecision", "GradientClip",
           "GradientAccumulation", "ActivationCheckpointing", "MixUp", "CutMix", "SWA", "EMA", "EarlyStopping",
           "SaveBest", "ReduceLROnPlateau", "TerminateOnNaN", "Checkpoint", "Resume", "DistributedDataParallel",
           "FSDP", "Compile", "CSVLogger", "MLflowLogger",
           "PredictionHistogram", "SamplePredictions", "ShowGraph"]
