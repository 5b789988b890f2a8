"""Runs pytorch's own generic optimizer suite (``TestOptimRenewed`` in pytorch's
test/test_optim.py) against this library's AdamW, Lion and Muon (docs/contract.md).

pytorch's wheel ships the suite's machinery (torch/testing/_internal) but not test_optim.py:
copy the test_optim.py of a pytorch checkout matching your torch into this folder, then

    pip install expecttest
    python -m pytest tools/torch_optim_suite/test_optim.py -q -k TestOptimRenewed

Before test_optim.py is imported (its ``@optims`` decorators read ``optim_db`` when its classes
are defined), ``optim_db`` is replaced by the entries of entries.py: ours, and torch's own Muon
entry beside them as the reference. ``TORCH_SUITE_ENTRIES=OursMuon,TorchMuon`` keeps a subset.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from entries import ENTRIES, EXTRA  # noqa: E402
from torch.testing._internal.common_optimizers import optim_db  # noqa: E402

_chosen = os.environ.get("TORCH_SUITE_ENTRIES")
optim_db[:] = [{**ENTRIES, **EXTRA}[name] for name in (_chosen.split(",") if _chosen else ENTRIES)]
