"""optimizer: AdamW, Lion, Muon and learning-rate schedules for PyTorch.

- ``optimizer.adamw``: :class:`AdamW` and the functional :func:`adamw`
- ``optimizer.lion``: :class:`Lion` and the functional :func:`lion`
- ``optimizer.muon``: :class:`Muon` (Muon for matrices, AdamW for the rest, in one
  optimizer) and the functional :func:`muon`
- ``optimizer.adamw8bit``, ``optimizer.lion8bit``: :class:`AdamW8bit`, :class:`Lion8bit`
  (8-bit states, Note [8-bit states] in ``optimizer._8bit``)
- ``optimizer.scheduler``: schedules as pure functions of the step, the
  :class:`WarmupCosineScheduler` and :class:`ScheduleLR` adapters, :func:`get_scheduler`

``import optimizer`` needs only torch.
"""

# The functional entries stay in their modules (optimizer.adamw.adamw, optimizer.lion.lion):
# exported here they would hide the modules of the same name.
from .adamw import AdamW
from .adamw8bit import AdamW8bit
from .lion import Lion
from .lion8bit import Lion8bit
from .muon import Muon
from .scheduler import SCHEDULES, ScheduleLR, WarmupCosineScheduler, get_scheduler, make_schedule
from .sparse_adamw import SparseAdamW

__all__ = [
    "SCHEDULES",
    "AdamW",
    "AdamW8bit",
    "Lion",
    "Lion8bit",
    "Muon",
    "ScheduleLR",
    "SparseAdamW",
    "WarmupCosineScheduler",
    "get_scheduler",
    "make_schedule",
]
__version__ = "0.1.0"
