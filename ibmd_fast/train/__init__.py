"""Training: the bridge-matching teacher trainer (MATH.md 4) and the IBMD distiller (MATH.md 5, Algorithm 1).

- ``train_teacher(TeacherConfig(...))`` / ``distill(DistillConfig(...))``: each writes
  ``config.json``, ``stats.jsonl``, ``log.txt``, PNG sample grids, atomic checkpoints
  (auto-resumed from the newest good one) and, at the end, a safetensors release; both run
  the one loop of ``loop.run_training``, each as a ``TrainingTask`` (its state, step and release).
- ``CheckpointIO``: state_dict checkpoints in the manner of NVlabs/edm2.
- ``EMA``: exponential moving average by ``lerp``.
- ``distributed``: torchrun / DDP helpers (``torchrun --nproc_per_node=N ...``).
"""

from ibmd_fast.train.checkpoint import CheckpointError, CheckpointIO, CheckpointMismatchError, CheckpointWarning
from ibmd_fast.paths import DEFAULT_TEACHER
from ibmd_fast.train.ibmd import IBMD, DistillConfig, distill
from ibmd_fast.train.optim import TrainingDivergedError
from ibmd_fast.train.ema import EMA
from ibmd_fast.train.teacher import TeacherConfig, train_teacher

__all__ = [
    "TeacherConfig",
    "DistillConfig",
    "train_teacher",
    "distill",
    "CheckpointIO",
    "EMA",
    "IBMD",
    "DEFAULT_TEACHER",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointWarning",
    "TrainingDivergedError",
]
