"""optimizer: AdamW, Lion and learning-rate schedules for PyTorch.

- ``optimizer.adamw``: :class:`AdamW` and the functional :func:`adamw`
- ``optimizer.lion``: :class:`Lion` and the functional :func:`lion`
- ``optimizer.scheduler``: schedules as pure functions of the step, the
  :class:`WarmupCosineScheduler` and :class:`ScheduleLR` adapters, :func:`get_scheduler`

``import optimizer`` needs only torch.
"""

from .adamw import AdamW, adamw
from .lion import Lion, lion
from .scheduler import SCHEDULES, ScheduleLR, WarmupCosineScheduler, get_scheduler, make_schedule

__all__ = [
    "SCHEDULES",
    "AdamW",
    "Lion",
    "ScheduleLR",
    "WarmupCosineScheduler",
    "adamw",
    "get_scheduler",
    "lion",
    "make_schedule",
]
__version__ = "0.1.0"
