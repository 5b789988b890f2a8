"""The one table of optimizers the generic tests run over (cf. torch's common_optimizers.py).

A new optimizer is a new row: its class, its backends, the configurations worth
trying, a float64 transcription of its paper's formulas, the bad inputs with the
error each must raise, and every other fact about it a test needs (learning rates,
tolerances, kernel names, the settings that pick a backend, the distributed runs'
settings). Tests take these from the row and never ask which optimizer they run;
a test of one algorithm alone names it in its own name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from optimizer import AdamW, Lion

# ---------------------------------------------------------------------------
# float64 transcriptions of the papers' formulas, written independently of the
# package: plain element-wise algebra, no lerp, no in-place tricks.
# ---------------------------------------------------------------------------

def adamw_formula(p, g, state, *, t, lr, betas, eps, weight_decay, correct_bias=True, maximize=False):
    """Loshchilov & Hutter (2019), Algorithm 2 (AdamW), schedule multiplier folded into lr."""
    b1, b2 = betas
    if maximize:
        g = -g
    m = b1 * state["exp_avg"] + (1 - b1) * g
    v = b2 * state["exp_avg_sq"] + (1 - b2) * g * g
    m_hat = m / (1 - b1**t) if correct_bias else m
    v_hat = v / (1 - b2**t) if correct_bias else v
    p = p - lr * weight_decay * p - lr * m_hat / (torch.sqrt(v_hat) + eps)
    return p, {"exp_avg": m, "exp_avg_sq": v}


def lion_formula(p, g, state, *, t, lr, betas, weight_decay, maximize=False):
    """Chen et al. (2023), Algorithm 2 (Lion)."""
    b1, b2 = betas
    if maximize:
        g = -g
    c = b1 * state["exp_avg"] + (1 - b1) * g
    p = p - lr * (torch.sign(c) + weight_decay * p)
    m = b2 * state["exp_avg"] + (1 - b2) * g
    return p, {"exp_avg": m}


def lion_near_sign_flip(state, g, *, rel, betas, maximize=False, **_):
    """Where Lion's update jumps: it steps by sign(c), c = beta1 m + (1 - beta1) g; where c is
    within ``rel`` of the size of its terms, float32 rounding may give c the other sign than
    float64 does (a difference of 2 lr). float64 state and gradient in, a boolean mask out."""
    b1 = betas[0]
    m = state["exp_avg"]
    g = -g if maximize else g
    c = b1 * m + (1 - b1) * g
    return c.abs() <= rel * (m.abs() + g.abs())


@dataclass
class OptimizerInfo:
    name: str
    cls: type
    # keyword arguments of the backends the tests compare with the reference (foreach=False)
    backends: dict[str, dict[str, Any]]
    # constructor settings worth trying (besides the defaults)
    configs: list[dict[str, Any]]
    formula: Callable[..., Any]
    state_tensor_keys: tuple[str, ...]
    # hypothesis strategy pieces: hyper-parameter name -> (low, high) for random draws
    ranges: dict[str, tuple[float, float]]
    # a learning rate at which a backend is compared with the reference step by step, where a
    # config sets none (test_fused_triton.py)
    step_lr: float
    # the hyper-parameters of the multi-process runs (dist_workers.py)
    dist_hyper: dict[str, Any]
    # the fused GPU path's Triton kernel, by its name in optimizer/_fused_triton.py, and the
    # number of tensors it reads and writes per element (test_fused_triton.py)
    triton_kernel: str
    kernel_streams: tuple[int, int]
    # (rtol, atol) of the parameters against the float64 formula under state_dtype=bfloat16,
    # elements near a jump (see near_jump) left out (test_numerics.py)
    bf16_state_tol: tuple[float, float]
    # (kwargs, exception type, words the message must contain)
    bad_inputs: list[tuple[dict[str, Any], type, tuple[str, ...]]] = field(default_factory=list)
    # settings put into a group after construction that this optimizer's step must refuse, beyond
    # those every row refuses (test_failures.py): name -> (group settings, exception type, words
    # the message must contain)
    bad_step_settings: dict[str, tuple[dict[str, Any], type, str]] = field(default_factory=dict)
    # a learning rate that makes a small regression learn in a few dozen steps
    train_lr: float = 1e-2
    # constructor settings that send the fused CPU path to our C loop (Note [fused CPU]) where
    # the defaults would take torch's fused kernel (test_fused_cpu.py, test_failures.py,
    # test_layouts.py)
    c_loop_kwargs: dict[str, Any] = field(default_factory=dict)
    # settings of a group whose CPU step needs no C loop (test_failures.py)
    no_c_loop_group: dict[str, Any] = field(default_factory=lambda: dict(foreach=True, fused=False))
    # where the update jumps (a float32 and a float64 run may then differ by a whole step):
    # (float64 state, float64 gradient, rel=..., **hyper-parameters) -> boolean mask of the
    # elements within ``rel`` of a jump; None for an update continuous in state and gradient
    # (test_numerics.py, test_fused_cpu.py)
    near_jump: Callable[..., torch.Tensor] | None = None


COMMON_BAD = [
    (dict(lr=-1e-3), ValueError, ("learning rate", "-0.001")),
    (dict(lr=float("nan")), ValueError, ("learning rate", "nan")),
    (dict(lr=float("inf")), ValueError, ("learning rate", "inf")),
    (dict(lr=torch.tensor(-1.0)), ValueError, ("learning rate", "-1.0")),
    (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, ("learning rate", "(2,)")),
    (dict(betas=(1.0, 0.999)), ValueError, ("beta parameter at index 0", "1.0")),
    (dict(betas=(0.9, -0.1)), ValueError, ("beta parameter at index 1", "-0.1")),
    (dict(betas=(0.9, 1.5)), ValueError, ("beta parameter at index 1", "1.5")),
    (dict(betas=(0.9,)), ValueError, ("betas", "(0.9,)")),
    (dict(betas=(0.9, torch.tensor(0.999))), ValueError, ("betas", "tensor betas are not supported")),
    (dict(weight_decay=torch.tensor(0.1)), TypeError, ("weight_decay", "tensor")),
    (dict(weight_decay=-0.1), ValueError, ("weight_decay", "-0.1")),
    (dict(weight_decay=float("nan")), ValueError, ("weight_decay", "nan")),
    (dict(maximize="yes"), ValueError, ("maximize", "'yes'")),
    (dict(foreach=1), ValueError, ("foreach", "1")),
    (dict(fused="no"), ValueError, ("fused", "'no'")),
    (dict(foreach=True, fused=True), ValueError, ("foreach=True and fused=True",)),
    (dict(state_dtype=torch.float16), ValueError, ("state_dtype", "torch.float16")),
    (dict(state_dtype="bf16"), ValueError, ("state_dtype", "'bf16'")),
]

OPTIMIZERS = [
    OptimizerInfo(
        name="AdamW",
        cls=AdamW,
        backends={"foreach": dict(foreach=True), "fused": dict(fused=True)},
        configs=[
            dict(),
            dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
            dict(correct_bias=False, weight_decay=0.0),
            dict(maximize=True),
            dict(lr=torch.tensor(2e-3)),
        ],
        formula=adamw_formula,
        state_tensor_keys=("exp_avg", "exp_avg_sq"),
        ranges=dict(
            lr=(1e-5, 1e-1), beta1=(0.0, 0.99), beta2=(0.5, 0.9999), eps=(1e-10, 1e-4), weight_decay=(0.0, 0.5)
        ),
        step_lr=1e-2,
        dist_hyper=dict(lr=1e-2, weight_decay=0.1),
        triton_kernel="_adamw_kernel",
        kernel_streams=(4, 3),  # reads p, g, m, v; writes p, m, v
        bf16_state_tol=(1e-5, 1e-6),
        bad_inputs=COMMON_BAD
        + [
            (dict(eps=-1e-8), ValueError, ("epsilon", "-1e-08")),
            (dict(eps=float("inf")), ValueError, ("epsilon", "inf")),
            (dict(correct_bias=None), ValueError, ("correct_bias", "None")),
        ],
        bad_step_settings={
            "step size beyond float32": (
                dict(lr=1e37, betas=(0.99999, 0.999)),
                ValueError,
                "step size lr / (1 - beta1)",
            ),
            "inf eps": (dict(eps=float("inf")), ValueError, "eps"),
        },
        train_lr=3e-2,
        c_loop_kwargs=dict(correct_bias=False),  # with correct_bias, fp32/fp64 go to torch's kernel
        no_c_loop_group=dict(foreach=None, fused=None),  # the default: torch's fused kernel
        near_jump=None,
    ),
    OptimizerInfo(
        name="Lion",
        cls=Lion,
        backends={"foreach": dict(foreach=True), "fused": dict(fused=True)},
        configs=[
            dict(),
            dict(lr=3e-4, betas=(0.95, 0.98), weight_decay=1.0),
            dict(betas=(0.9, 0.9)),
            dict(maximize=True, weight_decay=0.1),
            dict(lr=torch.tensor(1e-4)),
        ],
        formula=lion_formula,
        state_tensor_keys=("exp_avg",),
        ranges=dict(lr=(1e-5, 1e-2), beta1=(0.0, 0.99), beta2=(0.0, 0.999), weight_decay=(0.0, 2.0)),
        step_lr=1e-3,
        dist_hyper=dict(lr=1e-3, weight_decay=0.5),
        triton_kernel="_lion_kernel",
        kernel_streams=(3, 2),  # reads p, g, m; writes p, m
        bf16_state_tol=(1e-6, 1e-7),  # away from a jump, sign(c) is exact
        bad_inputs=COMMON_BAD,
        bad_step_settings={},
        train_lr=3e-3,
        c_loop_kwargs={},  # the fused CPU path is the C loop
        no_c_loop_group=dict(foreach=True, fused=False),
        near_jump=lion_near_sign_flip,
    ),
]


def hyper(config: dict[str, Any], info: OptimizerInfo) -> dict[str, Any]:
    """The full hyper-parameters (defaults filled in) as plain floats, for the formula."""
    import inspect

    sig = inspect.signature(info.cls.__init__)
    # how the update is run and stored, not in the formulas
    backends = ("self", "params", "foreach", "fused", "state_dtype", "stochastic_rounding", "seed", "min_8bit_size")
    hp = {k: p.default for k, p in sig.parameters.items() if k not in backends}
    hp.update({k: v for k, v in config.items() if k not in backends})
    if isinstance(hp["lr"], torch.Tensor):
        hp["lr"] = hp["lr"].item()
    return hp


def ids(infos):
    return [i.name for i in infos]
