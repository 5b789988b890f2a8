"""optimizer: AdamW, Lion and learning-rate schedules for PyTorch.

- ``optimizer.adamw``: :class:`AdamW` and the functional :func:`adamw`
- ``optimizer.lion``: :class:`Lion` and the functional :func:`lion`
- ``optimizer.scheduler``: schedules as pure functions of the step, the
  :class:`WarmupCosineScheduler` and :class:`ScheduleLR` adapters, :func:`get_scheduler`

``import optimizer`` needs only torch.
"""

# The functional entries stay in their modules (optimizer.adamw.adamw, optimizer.lion.lion):
# exported here they would hide the modules of the same name.
from .adamw import AdamW
from .lion import Lion
from .scheduler import SCHEDULES, ScheduleLR, WarmupCosineScheduler, get_scheduler, make_schedule

__all__ = [
    "SCHEDULES",
    "AdamW",
    "Lion",
    "ScheduleLR",
    "WarmupCosineScheduler",
    "get_scheduler",
    "make_schedule",
]
__version__ = "0.1.0"
