"""Training: one readable loop (:class:`Trainer`), resumable checkpoints, DDP/FSDP2 under torchrun.

    from ssmkit.models import get_preset
    from ssmkit.data import DataConfig
    from ssmkit.train import Trainer, TrainConfig
    Trainer(get_preset("byte-small"), TrainConfig(time_minutes=5), DataConfig(), "runs/demo").fit()
"""

from ssmkit.train.config import TrainConfig
from ssmkit.train.errors import TrainingError
from ssmkit.train.trainer import RUN_FILE, Trainer, evaluate, lr_at

__all__ = ["RUN_FILE", "TrainConfig", "Trainer", "TrainingError", "evaluate", "lr_at"]
