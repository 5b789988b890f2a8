"""The one table of optimizers the generic tests run over (cf. torch's common_optimizers.py).

A new optimizer is a new row: its class, its backends, the configurations worth
trying, a float64 transcription of its paper's formulas, the bad inputs with the
error each must raise, and every other fact about it a test needs (learning rates,
tolerances, kernel names, the settings that pick a backend, the distributed runs'
settings). Tests take these from the row and never ask which optimizer they run;
a test of one algorithm alone names it in its own name.

:data:`TABLE` is every row: the contract, numerics, compile, failure and layout tests run
over it. :data:`OPTIMIZERS` is its rows with element-wise fused kernels (C and Triton) that
run on FSDP2 shards: the kernel tests and the multi-process runs iterate these. Muon's
fused path is its batched matrix products; its multi-process runs are its own
(dist_workers.py), since FSDP2 gathers each matrix for its iteration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from optimizer import AdamW, Lion, Muon

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


def newton_schulz_formula(u, *, coefficients, steps, eps):
    """Jordan et al. (2024): the quintic iteration on the short side of one matrix, in float64."""
    a, b, c = coefficients
    tall = u.shape[0] > u.shape[1]
    x = u.T if tall else u
    x = x / max(torch.linalg.norm(x).item(), eps)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


def muon_scale(adjust_lr_fn, rows, cols):
    if rows * cols == 0:
        return 1.0
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * max(rows, cols) ** 0.5     # Liu et al. (2025), Moonlight
    return max(1.0, rows / cols) ** 0.5         # Jordan et al. (2024)


def muon_formula(p, g, state, *, t, lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps,
                 adjust_lr_fn, maximize=False, adamw_lr=None, adamw_betas, adamw_eps, adamw_weight_decay, **_):
    """Muon (Jordan et al. 2024; Liu et al. 2025) on a tensor of at least 2 dimensions (a 3-D one
    is a stack of matrices); the others are MuonByShape's AdamW groups: AdamW's formula with the
    adamw_* settings."""
    if p.dim() < 2:
        return adamw_formula(p, g, state, t=t, lr=lr if adamw_lr is None else adamw_lr, betas=adamw_betas,
                             eps=adamw_eps, maximize=maximize,
                             weight_decay=weight_decay if adamw_weight_decay is None else adamw_weight_decay)
    if maximize:
        g = -g
    m = momentum * state.get("momentum_buffer", torch.zeros_like(p)) + (1 - momentum) * g
    u = g + momentum * (m - g) if nesterov else m
    mats = u if u.dim() == 3 else u.reshape(1, u.shape[0], u[0].numel() if len(u) else 0)  # a stack, or one matrix
    o = torch.stack([newton_schulz_formula(x, coefficients=ns_coefficients, steps=ns_steps, eps=eps)
                     for x in mats]).reshape(p.shape) if mats.shape[0] else torch.zeros_like(p)
    rows, cols = mats.shape[-2:]
    p = p - lr * weight_decay * p - lr * muon_scale(adjust_lr_fn, rows, cols) * o
    return p, {"momentum_buffer": m}


class MuonByShape(Muon):
    """Muon as the generic tests drive it. They pass tensors of every shape in one list or group;
    this splits each group as a user splits a model by hand (torch.optim.Muon's documentation):
    the tensors of fewer than 2 dimensions in an AdamW group
    (``use_muon=False``), then the others in a Muon group, each with the group's settings (``lr``,
    ``weight_decay``, ...): the last group of a test is a Muon group. All the rest is Muon's."""

    def add_param_group(self, param_group):
        params = param_group.get("params")
        if "use_muon" in param_group or not isinstance(params, (list, tuple)):
            return super().add_param_group(param_group)

        def is_matrix(p):
            t = p[1] if isinstance(p, tuple) else p
            return isinstance(t, torch.Tensor) and t.dim() >= 2

        matrices, others = [p for p in params if is_matrix(p)], [p for p in params if not is_matrix(p)]
        # the AdamW half takes the group's settings but Muon's own (momentum, ns_steps, ...), which
        # an AdamW group refuses; lr and weight_decay are both algorithms'
        adamw_half = {k: v for k, v in param_group.items() if k not in MUON_ONLY}
        if not matrices:
            return super().add_param_group({**adamw_half, "use_muon": False})
        if not others:
            return super().add_param_group({**param_group, "use_muon": True})
        super().add_param_group({**adamw_half, "params": others, "use_muon": False})
        super().add_param_group({**param_group, "params": matrices, "use_muon": True})


MUON_ONLY = ("momentum", "nesterov", "ns_coefficients", "ns_steps", "adjust_lr_fn", "ns_dtype", "flatten", "split")


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
    # the keys of the state shaped like a parameter that this optimizer keeps for parameter p
    # (several algorithms: each group's own); None: state_tensor_keys for every parameter
    state_keys_of: Callable[[torch.Tensor], tuple[str, ...]] | None = None
    # discrete settings worth drawing (hypothesis tests): name -> the values
    choices: dict[str, list[Any]] = field(default_factory=dict)
    # a hyper-parameter of the row's last group that every checkpoint of it holds, a good and a bad
    # value, and the words of the error the bad one raises: (key, good, bad, words) (test_contract.py)
    checked_key: tuple[str, Any, Any, str] = ("betas", (0.5, 0.6), (2.0, 0.9), "beta parameter at index 0: 2.0")
    # complex parameters are optimised as pairs of reals (else they are refused, naming the dtype)
    complex_params: bool = True
    # element-wise fused kernels (C, Triton) and FSDP2 shards: the rows of OPTIMIZERS
    fused_kernels: bool = True
    # (rtol, atol) of a backend against the reference step by step (None: assert_close's defaults)
    backend_tol: tuple[float, float] | None = None
    # settings under which two ways of computing a step (two backends; compiled and eager) are
    # compared step by step (test_numerics.py, test_compile.py, test_layouts.py, test_contract.py)
    exact_kwargs: dict[str, Any] = field(default_factory=dict)

    def keys_of(self, p):
        return self.state_tensor_keys if self.state_keys_of is None else self.state_keys_of(p)


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

TABLE = [
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
    OptimizerInfo(
        name="Muon",
        cls=MuonByShape,
        # its fused path (and foreach, and the default) is the batched one
        backends={"batched": dict(foreach=True), "fused": dict(fused=True)},
        configs=[
            dict(),
            dict(lr=2e-2, momentum=0.9, weight_decay=0.0, adjust_lr_fn="original"),
            dict(nesterov=False, adjust_lr_fn="match_rms_adamw", weight_decay=0.1),
            dict(maximize=True),
            dict(lr=torch.tensor(1e-2)),
        ],
        formula=muon_formula,
        state_tensor_keys=("momentum_buffer",),
        ranges=dict(lr=(1e-5, 1e-1), momentum=(0.0, 0.99), weight_decay=(0.0, 0.5)),
        step_lr=1e-2,
        dist_hyper=dict(lr=1e-2, weight_decay=0.1),
        triton_kernel="",
        kernel_streams=(0, 0),
        bf16_state_tol=(1e-5, 1e-6),  # (the iteration in float32: exact_kwargs)
        bad_inputs=[bad for bad in COMMON_BAD if "betas" not in bad[0]] + [
            (dict(momentum=1.5), ValueError, ("Invalid momentum", "1.5")),
            (dict(momentum=-0.1), ValueError, ("Invalid momentum", "-0.1")),
            (dict(nesterov=1), ValueError, ("nesterov", "1")),
            (dict(ns_coefficients=(3.4, -4.7)), ValueError, ("ns_coefficients", "(3.4, -4.7)")),
            (dict(ns_coefficients=(3.4, float("nan"), 2.0)), ValueError, ("ns_coefficients", "nan")),
            (dict(eps=0.0), ValueError, ("Invalid eps", "0.0")),
            (dict(eps=-1e-7), ValueError, ("Invalid eps", "-1e-07")),
            (dict(ns_steps=100), ValueError, ("ns_steps", "100")),
            (dict(ns_steps=2.5), ValueError, ("ns_steps", "2.5")),
            (dict(adjust_lr_fn="rms"), ValueError, ("adjust_lr_fn", "'rms'")),
            (dict(ns_dtype=torch.int8), ValueError, ("ns_dtype", "torch.int8")),
            (dict(flatten="yes"), ValueError, ("flatten", "'yes'")),
            (dict(split=0), ValueError, ("Invalid split", "0")),
            (dict(split=[2, -1]), ValueError, ("Invalid split", "[2, -1]")),
            (dict(adamw_lr=-1.0), ValueError, ("Invalid adamw_lr", "-1.0")),
            (dict(adamw_betas=(1.0, 0.9)), ValueError, ("Invalid adamw_betas", "index 0: 1.0")),
            (dict(adamw_eps=-1e-8), ValueError, ("Invalid adamw_eps", "-1e-08")),
            (dict(adamw_weight_decay=-0.1), ValueError, ("Invalid adamw_weight_decay", "-0.1")),
        ],
        bad_step_settings={  # (the last group is a Muon group of one 3 x 3 matrix)
            "momentum of 1": (dict(momentum=1.0), ValueError, "Invalid momentum: 1.0"),
            "split that does not fit": (dict(split=2), ValueError, "Invalid split: 2 does not divide the 3 rows"),
            "an AdamW option": (dict(betas=(0.9, 0.99)), ValueError, "Invalid option 'betas'"),
        },
        train_lr=2e-2,
        c_loop_kwargs={},
        no_c_loop_group=dict(foreach=True, fused=False),
        near_jump=None,
        state_keys_of=lambda p: ("momentum_buffer",) if p.dim() >= 2 else ("exp_avg", "exp_avg_sq"),
        choices=dict(nesterov=[True, False], adjust_lr_fn=[None, "original", "match_rms_adamw"]),
        checked_key=("momentum", 0.5, 2.0, "Invalid momentum: 2.0"),
        complex_params=False,
        fused_kernels=False,
        # batched bmm and per-matrix mm may round the float32 iteration differently (about 1e-6 of O)
        backend_tol=(1e-5, 1e-5),
        # the iteration in float32: bf16 matmuls of other kernels (bmm for small sizes, Inductor's)
        # round otherwise, and the iteration multiplies the direction's near-null singular values by
        # up to a^5 = 485, so a bf16 rounding there moves O by up to tenths (measured on the compile
        # test's model); in float32 the two agree to about 1e-6 of O (tests/test_muon.py compares
        # the bf16 backends with each other and with torch.optim.Muon)
        exact_kwargs=dict(ns_dtype=torch.float32),
    ),
]
OPTIMIZERS = [info for info in TABLE if info.fused_kernels]


def hyper(config: dict[str, Any], info: OptimizerInfo) -> dict[str, Any]:
    """The full hyper-parameters (defaults filled in) as plain floats, for the formula."""
    import inspect

    sig = inspect.signature(info.cls.__init__)
    # how the update is run and stored, not in the formulas
    backends = ("self", "params", "foreach", "fused", "state_dtype", "stochastic_rounding", "seed", "min_8bit_size",
                "ns_dtype",
                # other libraries' options, accepted at their default only (test_contract.py)
                "amsgrad", "capturable", "differentiable", "use_triton", "decoupled_weight_decay")
    hp = {k: p.default for k, p in sig.parameters.items() if k not in backends}
    hp.update({k: v for k, v in config.items() if k not in backends})
    if isinstance(hp["lr"], torch.Tensor):
        hp["lr"] = hp["lr"].item()
    return hp


def ids(infos):
    return [i.name for i in infos]
