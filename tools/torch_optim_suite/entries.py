"""OptimizerInfo entries for this library's AdamW, Lion and Muon, for pytorch's TestOptimRenewed
(conftest.py puts them in ``optim_db``), with torch's own Muon entry beside them.

OptimizerInfo.name (the part of a test's name that names the optimizer) is overridden so that
ours do not clash with torch's "Muon"; the class names stay as they are, because test_optim.py
switches on ``optim_cls.__name__ == "Muon"`` (2-D parameters only) and ``== "AdamW"``.
"""
import pathlib
import sys
import unittest

import torch
from torch.testing._internal.common_methods_invocations import DecorateInfo
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    get_error_inputs_for_all_optims,
    optim_db,
)

from optimizer import AdamW, Lion, Muon


class NamedOptimizerInfo(OptimizerInfo):
    def __init__(self, test_name, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._test_name = test_name

    @property
    def name(self):
        return self._test_name


# ---------------------------------------------------------------- AdamW and Lion (control)
def optim_inputs_func_ours_adamw(device, dtype=None):
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 0.01}, desc="non-default lr"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.1}, desc="weight_decay"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.1, "maximize": True}, desc="maximize"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.001)}, desc="Tensor lr"),
        OptimizerInput(params=None, kwargs={"state_dtype": torch.bfloat16}, desc="bf16 state"),
        OptimizerInput(params=None, kwargs={"correct_bias": False}, desc="correct_bias=False"),
    ]


def optim_inputs_func_ours_lion(device, dtype=None):
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 1e-3}, desc="non-default lr"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.1}, desc="weight_decay"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.1, "maximize": True}, desc="maximize"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(1e-3)}, desc="Tensor lr"),
        OptimizerInput(params=None, kwargs={"state_dtype": torch.bfloat16}, desc="bf16 state"),
    ]


# ---------------------------------------------------------------- Muon
def optim_inputs_func_ours_muon(device, dtype=None):
    # torch 2.13's optim_inputs_func_muon, verbatim ...
    inputs = [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 0.01}, desc="non-default lr"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.001)}, desc="Tensor lr"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.2}, desc="non-default weight_decay"),
        OptimizerInput(params=None, kwargs={"momentum": 0.8}, desc="non-default momentum"),
        OptimizerInput(params=None, kwargs={"ns_steps": 6}, desc="passing alternative ns_steps"),
        OptimizerInput(params=None, kwargs={"ns_coefficients": (3.4, -4.7, 2.0)},
                       desc="passing alternative ns_coefficients"),
    ]
    # ... and what ours adds (maximize, nesterov, the other lr scale, bf16 state)
    inputs += [
        OptimizerInput(params=None, kwargs={"maximize": True}, desc="maximize"),
        OptimizerInput(params=None, kwargs={"nesterov": False, "adjust_lr_fn": "match_rms_adamw"},
                       desc="nesterov=False, match_rms_adamw"),
        OptimizerInput(params=None, kwargs={"state_dtype": torch.bfloat16}, desc="bf16 state"),
    ]
    return inputs


def optim_error_inputs_func_ours_muon(device, dtype):
    """torch's optim_error_inputs_func_muon, each Muon-specific input kept and its expected error
    changed to ours (docs/contract.md#muon: ours stacks a 3-D tensor, so a 1-D one is the
    refused shape; errors name the argument; complex is refused at construction)."""
    error_inputs = []
    # torch's inputs for every optimizer, with torch's expected errors but where ours differ by
    # decision (docs/contract.md): a parameter twice in one group is refused, not warned about
    ours = {
        "a param group cannot have duplicate parameters": (ValueError, "already appears in the same group"),
    }
    for ei in get_error_inputs_for_all_optims(device, dtype):
        if ei.optimizer_error_input.desc in ours:
            ei.error_type, ei.error_regex = ours[ei.optimizer_error_input.desc]
        error_inputs.append(ei)
    complex_param = torch.rand(2, 3, device=device, dtype=torch.complex64)
    complex_param.grad = torch.rand_like(complex_param)
    non_2d_param = torch.rand(2, device=device, dtype=dtype)
    non_2d_param.grad = torch.rand_like(non_2d_param)
    param = torch.rand(2, 3, device=device, dtype=dtype)
    param.grad = torch.rand_like(param)
    error_inputs += [
        ErrorOptimizerInput(
            OptimizerInput(params=[non_2d_param], kwargs=dict(), desc="only support >= 2D parameters"),
            error_type=ValueError, error_regex="Invalid params: .* has 1 dimension",
            error_on=OptimizerErrorEnum.CONSTRUCTION_ERROR,
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=[param], kwargs={"adjust_lr_fn": "arbitrary"},
                           desc="only support `original` and `match_rms_adamw`"),
            error_type=ValueError, error_regex="Invalid adjust_lr_fn: 'arbitrary'",
            error_on=OptimizerErrorEnum.CONSTRUCTION_ERROR,
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=[complex_param], kwargs=dict(), desc="does not support complex parameters"),
            error_type=ValueError, error_regex="Invalid params: .* is torch.complex64",
            error_on=OptimizerErrorEnum.CONSTRUCTION_ERROR,
        ),
    ]
    return error_inputs


# (a) our own generic tests' way of feeding Muon every test's parameter list: each group split into
# an AdamW group of its tensors of fewer than 2 dimensions and a Muon group of the others
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests"))
from optim_table import MuonByShape  # noqa: E402

TORCH_MUON = next(o for o in optim_db if o.optim_cls is torch.optim.Muon)
_COMPILE_SKIP = TORCH_MUON.decorators  # (CompiledOptimizerParityTests only; kept for fidelity)

ENTRIES = {
    "TorchMuon": TORCH_MUON,  # torch's own entry, unchanged (its test-name part is "Muon")
    "OursAdamW": NamedOptimizerInfo(
        "OursAdamW", AdamW,
        optim_inputs_func=optim_inputs_func_ours_adamw,
        supported_impls=("foreach", "fused"),
        supports_fused_on=("cpu", "cuda"),
    ),
    "OursLion": NamedOptimizerInfo(
        "OursLion", Lion,
        optim_inputs_func=optim_inputs_func_ours_lion,
        supported_impls=("foreach", "fused"),
        supports_fused_on=("cpu", "cuda"),
    ),
    # (b) as torch's Muon entry: the class is named Muon, so test_optim.py gives it 2-D params only
    "OursMuon": NamedOptimizerInfo(
        "OursMuon", Muon,
        optim_inputs_func=optim_inputs_func_ours_muon,
        optim_error_inputs_func=optim_error_inputs_func_ours_muon,
        supported_impls=("foreach", "fused"),
        supports_fused_on=("cpu", "cuda"),
        not_og_supported_flags=(),
        supports_complex=False,
        skips=(
            *_COMPILE_SKIP,
            # these build nn.Linear models with biases (1-D) for every optimizer: torch's Muon
            # entry never reaches them (supported_impls=()); entry (a) runs them
            *(DecorateInfo(unittest.skip("1-D biases: run by OursMuonByShape"), "TestOptimRenewed", t)
              for t in ("test_foreach_matches_forloop", "test_fused_matches_forloop",
                        "test_fused_error_on_params_on_meta")),
        ),
    ),
    # (a) every test's parameter list, split by shape
    "OursMuonByShape": NamedOptimizerInfo(
        "OursMuonByShape", MuonByShape,
        optim_inputs_func=optim_inputs_func_ours_muon,
        supported_impls=("foreach", "fused"),
        supports_fused_on=("cpu", "cuda"),
        not_og_supported_flags=(),
        supports_complex=False,
        skips=_COMPILE_SKIP,
    ),
}


# Opt-in (TORCH_SUITE_ENTRIES=TorchMuonX3): torch's own Muon with its own inputs listed three times
# (18 configs without weight_decay, as many as OursMuon has), to show that
# test_step_is_noop_for_zero_grads fails for torch.optim.Muon too once it steps that many configs.
def _torch_muon_inputs_x3(device, dtype=None):
    return [oi for _ in range(3) for oi in TORCH_MUON.optim_inputs_func(device, dtype)]


EXTRA = {
    "TorchMuonX3": NamedOptimizerInfo(
        "TorchMuonX3", torch.optim.Muon,
        optim_inputs_func=_torch_muon_inputs_x3,
        supported_impls=(), not_og_supported_flags=(), supports_complex=False,
    ),
}
