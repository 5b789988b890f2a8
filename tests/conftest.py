import os

import torch
from hypothesis import HealthCheck, settings

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors (test_fused_triton.py);
# it must be chosen before the kernels are defined (on first use, after this)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# 25 examples a property by default; CI replays the same examples every run (a red CI then
# means a change broke something); HYPOTHESIS_PROFILE=thorough explores many more.
common = dict(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("quick", **common)
settings.register_profile("ci", **common, derandomize=True)
settings.register_profile("thorough", **dict(common, max_examples=400))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "quick"))
