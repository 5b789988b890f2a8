"""Train the small LLaMA once per optimizer, with checkpoints that resume exactly,
then write the table, ``loss.png``, ``lr.png`` and ``summary.json``.

Precision (``--param-dtype``, ``--state-dtype``, ``--stochastic-rounding``): bf16
parameters (and their gradients) are the model's only copy of its weights (no float32
master weights: the optimizer does its math in float32 and rounds the result into them,
to nearest or stochastically, Note [stochastic rounding] in optimizer/_rounding.py); the
model computes in float32 from them (llama.py). ``uint8`` states are 8-bit with a scale
per row and block of 256 values (Note [8-bit states]). The memory columns count every
tensor of the optimizer's state (codes, scales, step counters).

The loop, its checkpoints, resume and interrupt handling must agree step for step, so
they sit in one file, to be read together."""

from __future__ import annotations

import inspect
import json
import math
import os
import pathlib
import secrets
import signal
import statistics
import sys
import textwrap
import threading
import time
from collections.abc import Iterable
from typing import Any

import torch

from ..factory import OPTIMIZERS, clip_grad_norm_, create_optimizer, describe_groups
from ..scheduler import SCHEDULES, get_scheduler
from . import parallel
from .data import Batches, load_text, split, unigram_entropy
from .llama import Llama

# Every setting of the demo with its default; the CLI flags, the config file's keys
# and the checkpoints' and summary's "config" are these names. None: follows --steps
# (see resolve_defaults).
DEFAULTS: dict[str, Any] = {
    "optimizers": ["adamw", "lion", "muon"],
    "schedule": "cosine",
    "warmup_steps": None,  # a tenth of the steps
    "min_lr_ratio": None,  # 0.1, or 0 for the schedules without a floor (constant, inverse_sqrt)
    "steps": 300,
    "batch_size": 16,
    "seq_len": 128,
    "dim": 256,
    "layers": 4,
    "heads": 4,
    "clip_grad_norm": 1.0,
    "state_dtype": "fp32",  # the optimizers' states: fp32, bf16 or uint8 (optimizer_args may set one's own)
    "param_dtype": "fp32",  # the model's parameters: fp32 or bf16 (no fp32 master copy)
    "stochastic_rounding": False,  # round bf16 parameters stochastically (seeded by --seed)
    "eval_every": None,  # a sixth of the steps: 7 held-out points with step 0
    "checkpoint_every": None,  # a sixth of the steps
    "device": "cpu",
    "distributed": "none",  # under torchrun: "ddp" or "fsdp2" (parallel.py)
    "seed": 0,
    "out": "runs/demo",
    "optimizer_args": {},  # name -> keyword arguments (lr, weight_decay, betas, ...)
    "lr_from": None,  # a sweep.json whose best lrs the run took (--lr-from): said beside the table
}
# the settings a resumed run may change: where and how it runs, not what it computes
FREE_ON_RESUME = ("device", "distributed", "checkpoint_every", "out")
RESULT_FILES = ("summary.json", "loss.png", "lr.png")  # with one NAME.ckpt per optimizer
_CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "data_rng", "torch_rng", "history", "step", "config"}
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def optimizer_options(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """The keyword arguments optimizer ``name`` is built with: what ``--state-dtype`` and
    ``--stochastic-rounding`` give every optimizer, then its own ``optimizer_args`` (which win).
    fp32 states are the optimizers' default and pass nothing, so the default run is unchanged."""
    precision: dict[str, Any] = {}
    if cfg.get("state_dtype", "fp32") != "fp32":
        precision["state_dtype"] = cfg["state_dtype"]  # as text: create_optimizer reads it
    if cfg.get("stochastic_rounding"):
        precision.update(stochastic_rounding=True, seed=cfg["seed"] % 2**32)
    return {**precision, **cfg["optimizer_args"].get(name, {})}


def describe_precision(cfg: dict[str, Any]) -> str:
    """The run's precision for its titles, e.g. ``", bf16 params (stochastic rounding, no fp32 master
    copy), uint8 states"``; empty for fp32 parameters and states (the default run's titles are as before)."""
    parts = []
    if cfg.get("param_dtype", "fp32") != "fp32":
        rounding = "stochastic rounding" if cfg.get("stochastic_rounding") else "round to nearest"
        parts.append(f"{cfg['param_dtype']} params ({rounding}, no fp32 master copy)")
    if cfg.get("state_dtype", "fp32") != "fp32":
        parts.append("8-bit states" if cfg["state_dtype"] == "uint8" else f"{cfg['state_dtype']} states")
    return "".join(f", {p}" for p in parts)


def resolve_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fill the settings left at None from the run's length and schedule."""
    steps = cfg["steps"]
    fill = {"warmup_steps": steps // 10, "eval_every": max(1, steps // 6), "checkpoint_every": max(1, steps // 6),
            "min_lr_ratio": 0.1 if "min_lr" in inspect.signature(SCHEDULES[cfg["schedule"]]).parameters else 0.0}
    return {**cfg, **{k: v for k, v in fill.items() if cfg[k] is None}}


def save_atomic(obj: Any, path: pathlib.Path) -> None:
    """Write ``obj`` with torch.save so that ``path`` is either the old file or the whole new one. The
    temporary file is this writer's own (``NAME.PID.RANDOM.tmp``): no other writer can rename or remove it."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temporary_files(out: pathlib.Path) -> list[pathlib.Path]:
    """Temporary checkpoint files in ``out``, left by a run killed while it wrote one (the old fixed name
    ``NAME.ckpt.tmp`` too): removed by a run that holds the folder, since no other writer can be there."""
    return [p for n in OPTIMIZERS for p in (*out.glob(f"{n}.ckpt.*.tmp"), out / f"{n}.ckpt.tmp") if p.is_file()]


def read_checkpoints(out: pathlib.Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The checkpoints ``out/NAME.ckpt`` that exist, loaded on the CPU and checked (:func:`check_checkpoint`):
    a damaged one, or one whose contents do not fit together, is a one-line error naming the file."""
    found = {}
    for name in names:
        path = out / f"{name}.ckpt"
        if not path.is_file():
            continue
        try:
            ckpt = torch.load(path, weights_only=True, map_location="cpu")
            if not isinstance(ckpt, dict) or not _CHECKPOINT_KEYS <= set(ckpt):
                raise ValueError("not a checkpoint of the demo")
        except Exception as err:  # noqa: BLE001 - empty, cut short or foreign: torch raises many kinds
            raise ValueError(f"Invalid --resume: the checkpoint {path} is damaged ({_first_line(err)}); "
                             f"delete it to run {name} again from step 0, or start over with --overwrite") from None
        try:
            check_checkpoint(name, ckpt)
        except ValueError as err:
            raise ValueError(f"Invalid --resume: the checkpoint {path} cannot be resumed: {err}; delete it to run "
                             f"{name} again from step 0, or start over with --overwrite") from None
        found[name] = ckpt
    return found


def _first_line(err: BaseException, width: int = 160) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:width]}"


def _is_int(value: Any, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


# What each setting of a checkpoint's "config" must be to build its run (the flags' own checks,
# which name the flags, come after: cli._check_settings)
_SETTINGS: dict[str, tuple[Any, str]] = {
    "optimizers": (lambda v: isinstance(v, list) and v and all(n in OPTIMIZERS for n in v),
                   f"a list of names from {sorted(OPTIMIZERS)}"),
    "schedule": (lambda v: v in SCHEDULES, f"one of {sorted(SCHEDULES)}"),
    "warmup_steps": (_is_int, "a whole number >= 0"),
    "min_lr_ratio": (_is_number, "a number >= 0"),
    "steps": (lambda v: _is_int(v, 1), "a whole number >= 1"),
    "batch_size": (lambda v: _is_int(v, 1), "a whole number >= 1"),
    "seq_len": (lambda v: _is_int(v, 1), "a whole number >= 1"),
    "dim": (lambda v: _is_int(v, 1), "a whole number >= 1"),
    "layers": (lambda v: _is_int(v, 1), "a whole number >= 1"),
    "heads": (lambda v: _is_int(v, 1), "a whole number >= 1"),
    "clip_grad_norm": (_is_number, "a number >= 0"),
    "state_dtype": (lambda v: v in ("fp32", "bf16", "uint8"), "fp32, bf16 or uint8"),
    "param_dtype": (lambda v: v in PARAM_DTYPES, f"one of {sorted(PARAM_DTYPES)}"),
    "stochastic_rounding": (lambda v: isinstance(v, bool), "true or false"),
    "eval_every": (lambda v: _is_int(v, 1), "a whole number >= 1"),
    "checkpoint_every": (lambda v: _is_int(v, 1), "a whole number >= 1"),
    "device": (lambda v: isinstance(v, str), "text"),
    "distributed": (lambda v: v in ("none", "ddp", "fsdp2"), "none, ddp or fsdp2"),
    "seed": (_is_int, "a whole number >= 0"),
    "out": (lambda v: isinstance(v, str), "text"),
    "lr_from": (lambda v: v is None or isinstance(v, str), "a file name or null"),
    "optimizer_args": (lambda v: isinstance(v, dict) and all(isinstance(a, dict) for a in v.values()),
                       "{name: {keyword: value}}"),
}
_HISTORY = ("loss", "lr", "held_out", "step_ms", "wall_s")  # one entry per step, but held_out


def check_checkpoint(name: str, ckpt: dict[str, Any]) -> None:
    """Everything a resume reads from the checkpoint of optimizer ``name``, checked before any run
    starts (a ValueError saying what does not fit): its settings' types, its step and history, the
    random states, the model's tensors (names and shapes) against the model its settings make, and
    the model, optimizer and scheduler states loaded into a copy of the run built on the CPU."""
    saved = ckpt["config"]
    if not isinstance(saved, dict):
        raise ValueError(f"its config is {type(saved).__name__}, not a dict of settings")
    for key, (ok, rule) in _SETTINGS.items():
        if key in saved and not ok(saved[key]):
            raise ValueError(f"its config's {key} is {saved[key]!r} (expected {rule})")
    cfg = resolve_defaults({**DEFAULTS, **{k: v for k, v in saved.items() if k in DEFAULTS}})
    step, hist = ckpt["step"], ckpt["history"]
    if not _is_int(step) or step > cfg["steps"]:
        raise ValueError(f"its step is {step!r} (expected a whole number in [0, its steps {cfg['steps']}])")
    if not isinstance(hist, dict) or any(not isinstance(hist.get(k), list) for k in _HISTORY):
        raise ValueError(f"its history is not a dict of the lists {list(_HISTORY)}")
    if any(len(hist[k]) != step for k in _HISTORY if k != "held_out"):
        raise ValueError(f"its history holds {len(hist['loss'])} steps, its step is {step}")
    numbers = [x for k in _HISTORY if k != "held_out" for x in hist[k]]
    numbers += [x for point in hist["held_out"] for x in (point if isinstance(point, list) and len(point) == 2
                                                          else [None])]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers):
        raise ValueError("its history holds something other than numbers (and [step, loss] pairs)")
    for key, want in (("data_rng", torch.Generator().get_state()), ("torch_rng", torch.get_rng_state())):
        got = ckpt[key]
        if not isinstance(got, torch.Tensor) or got.dtype != want.dtype or got.shape != want.shape:
            raise ValueError(f"its {key} is not a random generator's state")
    try:
        with torch.random.fork_rng(devices=[]):  # building the copy draws numbers: the run's are its own
            model = _model(cfg, torch.device("cpu"))
            world = parallel.World() if ckpt.get("format", "index") == "index" else parallel.World(mode="ddp")
            opt, sched = _optimizer(name, model, cfg, world)  # ("full": loaded by parameter name, no process group)
    except Exception as err:  # noqa: BLE001 - the model's, the optimizer's and the scheduler's own checks
        raise ValueError(f"its settings do not build its run ({_first_line(err)})") from None
    expected, got = model.state_dict(), ckpt["model"]
    if not isinstance(got, dict):
        raise ValueError(f"its model is {type(got).__name__}, not a state dict")
    missing, unexpected = [k for k in expected if k not in got], [k for k in got if k not in expected]
    if missing or unexpected:
        which = f"lacks {missing[0]!r}" if missing else f"has {unexpected[0]!r}"
        raise ValueError(f"its model {which} ({len(missing)} of the {len(expected)} tensors its settings make "
                         f"missing, {len(unexpected)} unknown)")
    for key, want in expected.items():
        if not isinstance(got[key], torch.Tensor) or got[key].shape != want.shape or not got[key].is_floating_point():
            has = tuple(got[key].shape) if isinstance(got[key], torch.Tensor) else type(got[key]).__name__
            raise ValueError(f"its model's {key} is {has}, where its settings make a float tensor of shape "
                             f"{tuple(want.shape)}")
    loads = (("model and optimizer states do", lambda: parallel.load_full_state(model, opt, got, ckpt["optimizer"],
                                                                               world)),
             ("scheduler state does", lambda: sched.load_state_dict(ckpt["scheduler"])))
    for what, load in loads:
        try:
            load()
        except Exception as err:  # noqa: BLE001 - whatever torch's and our load_state_dict raise
            raise ValueError(f"its {what} not load ({_first_line(err)})") from None


class Interrupt:
    """While active, SIGINT and SIGTERM only set ``signum``: the training loop then writes a
    checkpoint and stops. The first signal puts the previous handlers back, so a second one
    acts as it would have (Ctrl-C twice stops at once)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()


@torch.no_grad()
def evaluate(model: Llama, held_out: torch.Tensor, seq_len: int, device: torch.device, windows: int = 48) -> float:
    """Mean loss over fixed windows spread evenly over the held-out text (no randomness)."""
    model.eval()
    starts = torch.linspace(0, len(held_out) - seq_len - 1, windows).long().tolist()
    rows = torch.stack([held_out[s : s + seq_len + 1] for s in starts]).long().to(device)
    _, loss = model(rows[:, :-1], rows[:, 1:])
    model.train()
    return loss.item()


def _model(cfg: dict[str, Any], device: torch.device) -> Llama:
    """The run's model at its seeded initialisation (as train_one and check_checkpoint build it)."""
    torch.manual_seed(cfg["seed"])
    model = Llama(dim=cfg["dim"], layers=cfg["layers"], heads=cfg["heads"], max_seq=cfg["seq_len"]).to(device)
    return model.store_parameters(PARAM_DTYPES[cfg.get("param_dtype", "fp32")])  # initialised in fp32


def _optimizer(name: str, model: torch.nn.Module, cfg: dict[str, Any], world: parallel.World):
    """Optimizer ``name`` for ``model`` (wrapped for ``world``) and its scheduler."""
    opt = parallel.prepare_optimizer(create_optimizer(model, name, **optimizer_options(cfg, name)), world)
    sched = get_scheduler(cfg["schedule"], opt, warmup_steps=cfg["warmup_steps"], total_steps=cfg["steps"],
                          min_lr_ratio=cfg["min_lr_ratio"])
    return opt, sched


def diverged(losses: list[float], warmup_steps: int, window: int = 10) -> bool:
    """Whether a run whose training losses so far are ``losses`` has diverged: its last loss is not
    finite, or, once warmup is over (and ``window`` steps done), the mean of its last ``window``
    losses is above its loss at the start. Averaged because one noisy step above the start is not
    divergence; from the end of warmup because a high lr may first raise the loss and recover."""
    if not math.isfinite(losses[-1]):
        return True
    return len(losses) > max(warmup_steps, window) and statistics.fmean(losses[-window:]) > losses[0]


def train_one(name: str, cfg: dict[str, Any], train_data, held_out, out: pathlib.Path, *, ckpt: dict | None,
              stop_after: int | None, progress: bool, interrupt: Interrupt, world: parallel.World,
              device: torch.device, save: bool = True, stop_if_diverged: bool = False) -> dict[str, Any]:
    """One optimizer's run, from ``ckpt`` if given; returns its results, or ``{"finished": False,
    "step": N, "interrupted": ...}`` when stopped early (``stop_after`` steps done, or a signal on any rank).
    ``save=False`` writes no checkpoint (the sweep's short runs); ``stop_if_diverged`` ends a run that
    :func:`diverged` at that step, with the held-out loss there, as a finished run with ``"diverged": True``."""
    model = _model(cfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    model = parallel.wrap(model, world)
    opt, sched = _optimizer(name, model, cfg, world)
    ckpt_format = "index" if world.mode == "none" else "full"  # opt.state_dict() / unsharded, by parameter name
    batches = Batches(train_data, cfg["batch_size"], cfg["seq_len"], cfg["seed"])
    hist: dict[str, list] = {"loss": [], "lr": [], "held_out": [], "step_ms": [], "wall_s": []}
    start, ckpt_path = 0, out / f"{name}.ckpt"
    say = print if world.main else (lambda *a, **k: None)
    if ckpt is not None:
        parallel.load_full_state(model, opt, ckpt["model"], ckpt["optimizer"], world)
        sched.load_state_dict(ckpt["scheduler"])
        batches.gen.set_state(ckpt["data_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        hist, start = ckpt["history"], ckpt["step"]
        say(f"{name}: resuming at step {start} of {cfg['steps']} from {ckpt_path}")
    else:
        hist["held_out"].append([0, evaluate(model, held_out, cfg["seq_len"], device)])

    def checkpoint(step: int) -> None:
        if not save:
            return
        model_sd, opt_sd = parallel.full_state(model, opt, world)  # every rank takes part
        if world.main:
            save_atomic({"model": model_sd, "optimizer": opt_sd, "scheduler": sched.state_dict(),
                         "data_rng": batches.gen.get_state(), "torch_rng": torch.get_rng_state(), "history": hist,
                         "step": step, "config": cfg, "format": ckpt_format}, ckpt_path)
        parallel.barrier(world)

    bar = None
    if progress and world.main:
        from tqdm import tqdm

        bar = tqdm(total=cfg["steps"], initial=start, desc=f"{name:6s}", unit="step", dynamic_ncols=True)
    tokens_per_step = cfg["batch_size"] * cfg["seq_len"]
    trained_s = sum(hist["wall_s"])  # seconds in training steps so far (resumed runs count their earlier steps)
    stopped, interrupted, blew_up = None, False, False
    for step in range(start, cfg["steps"]):
        if parallel.any_rank(interrupt.signum is not None, world, device):  # every rank stops at the same step
            stopped, interrupted = step, True
            break
        t_step = time.perf_counter()
        x, y = (parallel.rows(t, world).to(device) for t in batches.next())
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg["clip_grad_norm"]:
            clip_grad_norm_(model.parameters(), cfg["clip_grad_norm"])
        lr = opt.param_groups[0]["lr"]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        hist["step_ms"].append((time.perf_counter() - t0) * 1e3)
        sched.step()
        hist["loss"].append(parallel.mean(loss, world))
        hist["lr"].append(float(lr))
        hist["wall_s"].append(time.perf_counter() - t_step)
        trained_s += hist["wall_s"][-1]
        done = step + 1
        blew_up = stop_if_diverged and diverged(hist["loss"], cfg["warmup_steps"])
        if done % cfg["eval_every"] == 0 or done == cfg["steps"] or blew_up:
            hist["held_out"].append([done, evaluate(model, held_out, cfg["seq_len"], device)])
        if bar is not None:
            rate = tokens_per_s(len(hist["wall_s"]), tokens_per_step, trained_s)  # the table's figure, so far
            bar.set_postfix(loss=f"{hist['loss'][-1]:.3f}", lr=f"{lr:.1e}", tok_s=f"{rate:,.0f}")
            bar.update(1)
        if blew_up:
            break
        if stop_after is not None and done - start >= stop_after and done < cfg["steps"]:
            stopped = done
            break
        if done % cfg["checkpoint_every"] == 0 or done == cfg["steps"]:
            checkpoint(done)
    if bar is not None:
        bar.close()
    if stopped is not None:
        checkpoint(stopped)
        return {"finished": False, "step": stopped, "interrupted": interrupted}
    state_bytes = parallel.local_bytes(opt)
    return {
        "finished": True,
        "diverged": blew_up,
        "steps_done": len(hist["loss"]),
        "groups": describe_groups(opt),
        "peak_lrs": peak_lrs(opt),
        "params": n_params,
        "final_train_loss": statistics.fmean(hist["loss"][-10:]),
        "held_out_loss": hist["held_out"][-1][1],
        "tokens_per_s": tokens_per_s(len(hist["wall_s"]), tokens_per_step, sum(hist["wall_s"])),
        "optimizer_step_ms": statistics.median(hist["step_ms"]),
        "state_bytes": state_bytes,  # this rank's: every state tensor, 8-bit scales and step counters too
        "state_bytes_per_param": state_bytes / parallel.local_numel(model),  # per parameter this rank holds
        "history": hist,
    }


def peak_lrs(opt: torch.optim.Optimizer) -> dict[str, float]:
    """The peak lr of each algorithm of ``opt``, in the order of its groups: ``{"muon": 0.02,
    "adamw": 0.003}`` for Muon's groups (``use_muon``), one entry named after the optimizer for
    the others. The history's lr is the first group's; the scheduler scales every group from its
    own peak, so the others' curves are that one times the ratio of the peaks."""
    peaks: dict[str, float] = {}
    for g in opt.param_groups:
        algorithm = ("muon" if g["use_muon"] else "adamw") if "use_muon" in g else type(opt).__name__.lower()
        peaks.setdefault(algorithm, float(g.get("initial_lr", g["lr"])))
    return peaks


def tokens_per_s(steps: int, tokens_per_step: int, seconds: float) -> float:
    """The run's speed, as the progress bar and the table show it: tokens trained per second spent
    in training steps (batch, forward, backward, clipping, optimizer step), over every step so far;
    held-out evaluations and checkpoints are not counted."""
    return steps * tokens_per_step / seconds if seconds > 0 else 0.0


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average, debiased as in Adam: divided by ``1 - beta**t``, so it starts at the
    first value instead of lagging from 0 (a constant stays that constant)."""
    ema, out = 0.0, []
    for t, v in enumerate(values, 1):
        ema = beta * ema + (1 - beta) * v
        out.append(ema / (1 - beta**t))
    return out


def describe_run(cfg: dict[str, Any], params: int | None = None, width: int = 110) -> str:
    """The settings in a line: model, data, schedule, and each optimizer's lr and weight decay."""
    size = f", {params / 1e6:.2f} M parameters" if params else ""
    opts = "; ".join(
        f"{n} lr {cfg['optimizer_args'].get(n, {}).get('lr', OPTIMIZERS[n].lr):g} "
        f"wd {cfg['optimizer_args'].get(n, {}).get('weight_decay', OPTIMIZERS[n].weight_decay):g}"
        + "".join(f" {k} {v:g}" if isinstance(v, float) else f" {k} {v}"
                  for k, v in {**OPTIMIZERS[n].options, **cfg["optimizer_args"].get(n, {})}.items()
                  if k not in ("lr", "weight_decay"))
        for n in cfg["optimizers"])
    lines = [f"small LLaMA{size} ({cfg['dim']}x{cfg['layers']}, {cfg['heads']} heads), {cfg['steps']} steps of "
             f"{cfg['batch_size']}x{cfg['seq_len']} bytes, seed {cfg['seed']}",
             f"{cfg['schedule']} schedule, warmup {cfg['warmup_steps']}, floor {cfg['min_lr_ratio']:g} x peak, "
             f"clip {cfg['clip_grad_norm']:g}{describe_precision(cfg)}", opts]
    # a title a figure can hold: each part on its own lines, none wider than the plot
    return "\n".join(textwrap.fill(line, width, break_long_words=False) for line in lines)


def loss_figure(results: dict[str, dict[str, Any]], cfg: dict[str, Any], entropy: float, params: int | None = None):
    """Train loss per step (raw, faint, and smoothed) and held-out loss from step 0, one colour per optimizer,
    the settings in the title. The x axis counts updates: the loss at x is measured before update x + 1."""
    import matplotlib.pyplot as plt

    beta = 1 - 30 / max(cfg["steps"], 60)  # averages over ~3 % of the run: 0.9 for 300 steps
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for name, r in results.items():
        losses = r["history"]["loss"]
        raw, = ax.plot(range(len(losses)), losses, alpha=0.3, lw=0.8, label=f"{name} train (raw)")
        ax.plot(range(len(losses)), smooth(losses, beta), color=raw.get_color(), lw=1.8,
                label=f"{name} train (EMA {beta:.2g}, debiased)")
        steps, held = zip(*r["history"]["held_out"])
        ax.plot(steps, held, "o--", color=raw.get_color(), label=f"{name} held-out")
    ax.axhline(entropy, color="gray", ls=":", label=f"unigram entropy {entropy:.2f}")
    ax.set(xlabel="step", ylabel="cross-entropy (nats / byte)")
    ax.set_title(describe_run(cfg, params), fontsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


_GROUPS = {"muon": "matrices (Muon)", "adamw": "other tensors (AdamW)"}  # the lr plot's names of peak_lrs' keys


def lr_figure(results: dict[str, dict[str, Any]], cfg: dict[str, Any]):
    """The learning rate each optimizer stepped with, one linear panel each (their peaks differ
    ~10x), with the end of warmup and the end of the run marked; an optimizer of several
    algorithms (Muon's matrices and AdamW's other tensors) has a curve for each (dashed: the
    others', scaled from the first group's by the ratio of the peaks, :func:`peak_lrs`)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, sharex=True, squeeze=False, figsize=(7, 1.2 + 1.8 * len(results)))
    w, n = cfg["warmup_steps"], cfg["steps"]
    for ax, (name, r), color in zip(axes[:, 0], results.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        lrs = r["history"]["lr"]
        peaks = list(r.get("peak_lrs", {}).items())
        first = f"{name}: {_GROUPS.get(peaks[0][0], peaks[0][0])}" if len(peaks) > 1 else name
        ax.plot(range(len(lrs)), lrs, color=color, label=f"{first} (peak {max(lrs):.3g})")
        for algorithm, peak in peaks[1:]:
            scaled = [lr * peak / peaks[0][1] for lr in lrs]
            ax.plot(range(len(lrs)), scaled, color=color, ls="--",
                    label=f"{name}: {_GROUPS.get(algorithm, algorithm)} (peak {max(scaled):.3g})")
        ax.axvline(w, color="gray", ls=":", lw=0.8, label=f"end of warmup (step {w})")
        ax.axvline(n, color="gray", ls="--", lw=0.8, label=f"end (step {n})")
        ax.set(ylabel="learning rate", ylim=(0, None))
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"{cfg['schedule']} schedule: warmup {w}, {n} steps, floor {cfg['min_lr_ratio']:g} x peak",
                 fontsize=9)
    fig.tight_layout()
    return fig


def plot(results: dict[str, dict[str, Any]], cfg: dict[str, Any], entropy: float, out: pathlib.Path,
         params: int | None = None) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for fig, file in ((loss_figure(results, cfg, entropy, params), "loss.png"), (lr_figure(results, cfg), "lr.png")):
        fig.savefig(out / file, dpi=120)
        plt.close(fig)
        files.append(out / file)
    return files


def describe_lrs(cfg: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    """Where the table's peak lrs came from, in a line: the registry's defaults, the flags or config
    file, or ``--lr-from`` (each optimizer's best in a sweep); and Muon's second lr, its AdamW's."""
    given = [n for n in results if {"lr", "adamw_lr"} & set(cfg["optimizer_args"].get(n, {}))]
    if cfg.get("lr_from"):
        source = f"each optimizer's best in the lr sweep {cfg['lr_from']} (--lr-from)"
    elif not given:
        source = "the registry's defaults (optimizer.factory.OPTIMIZERS)"
    elif len(given) == len(results):
        source = "as given (flags or --config)"
    else:
        source = f"{', '.join(given)} as given, the others the registry's defaults"
    others = [f"{n}'s is its matrices' (the other tensors: AdamW at {r['peak_lrs']['adamw']:g})"
              for n, r in results.items() if len(r.get("peak_lrs", {})) > 1 and "adamw" in r["peak_lrs"]]
    return f"peak lr: {source}" + "".join(f"; {o}" for o in others)


def table(results: dict[str, dict[str, Any]], cfg: dict[str, Any], entropy: float,
          world: parallel.World | None = None) -> str:
    """The run's table as the demo prints it (``results`` as summary.json holds them), with the lines
    that say what its columns are and where the lrs came from."""
    world = world or parallel.World()
    params = next(iter(results.values()))["params"]
    lines = [f"small LLaMA, {params / 1e6:.2f} M parameters, {cfg['steps']} steps of "
             f"{cfg['batch_size']}x{cfg['seq_len']} bytes, {cfg['schedule']} schedule, warmup {cfg['warmup_steps']}"
             f"{describe_precision(cfg)}{parallel.describe(world)}"]
    state = "state MiB" if world.mode == "none" else "state MiB/rank"
    lines.append(f"{'optimizer':10s} {'peak lr':>8s} {'train loss':>10s} {'held-out':>9s} {'tokens/s':>9s} "
                 f"{'opt step ms':>12s} {state:>10s} {'state B/param':>13s}")
    for name, r in results.items():
        peak = next(iter(r["peak_lrs"].values())) if r.get("peak_lrs") else max(r["history"]["lr"])
        lines.append(f"{name:10s} {peak:8.2g} {r['final_train_loss']:10.3f} {r['held_out_loss']:9.3f} "
                     f"{r['tokens_per_s']:9,.0f} {r['optimizer_step_ms']:12.2f} {r['state_bytes'] / 2**20:10.2f} "
                     f"{r['state_bytes_per_param']:13.3f}")
    lines += [describe_lrs(cfg, results),
              f"held-out loss of a model that ignores context: {entropy:.3f}",
              "losses in nats per byte; train loss: the mean of the last 10 steps'; held-out: on the last 10% of "
              "the text",
              "tokens/s: tokens trained per second of training steps, over the whole run (the progress bar's "
              "figure); opt step ms: median time of the optimizer's step alone"]
    return "\n".join(lines)


def resume_hint(out: pathlib.Path, world: parallel.World) -> str:
    prog = "python -m optimizer" if world.mode == "none" else f"torchrun --nproc_per_node {world.size} -m optimizer"
    return f"continue with: {prog} demo --resume --out {out}"


def run(cfg: dict[str, Any], *, checkpoints: dict[str, dict[str, Any]] | None = None, overwrite: bool = False,
        stop_after: int | None = None, progress: bool = True) -> int:
    """Train each optimizer of ``cfg`` (resolved and checked settings), from ``checkpoints`` where given;
    ``overwrite`` first deletes the results of an earlier run in ``cfg["out"]``. Returns the exit code:
    0, or 128 + the signal's number when SIGINT / SIGTERM stopped it (after a checkpoint)."""
    world, device = parallel.start(cfg["distributed"], cfg["device"])
    try:
        with Interrupt() as interrupt:
            return _run(cfg, checkpoints or {}, overwrite=overwrite, stop_after=stop_after, progress=progress,
                        interrupt=interrupt, world=world, device=device)
    finally:
        parallel.stop(world)


def _run(cfg: dict[str, Any], checkpoints: dict[str, dict[str, Any]], *, overwrite: bool, stop_after: int | None,
         progress: bool, interrupt: Interrupt, world: parallel.World, device: torch.device) -> int:
    out = pathlib.Path(cfg["out"])
    if world.main:  # the writer, which holds the folder (Note [one run per folder] in folder.py)
        out.mkdir(parents=True, exist_ok=True)
        for file in temporary_files(out):
            file.unlink(missing_ok=True)
        if overwrite:
            for file in (*RESULT_FILES, *(f"{n}.ckpt" for n in OPTIMIZERS)):
                (out / file).unlink(missing_ok=True)
    parallel.barrier(world)
    say = print if world.main else (lambda *a, **k: None)
    text, source = load_text()
    train_data, held_out = split(text)
    entropy = unigram_entropy(bytes(held_out.tolist()))
    say(f"text: {source}, {len(text):,} bytes ({len(train_data):,} train / {len(held_out):,} held out); "
        f"unigram entropy of the held-out text {entropy:.3f} nats/byte")
    results, stopped, resuming = {}, {}, bool(checkpoints)
    for name in cfg["optimizers"]:
        if resuming and name not in checkpoints:
            say(f"{name}: no checkpoint yet, starting at step 0")
        r = train_one(name, cfg, train_data, held_out, out, ckpt=checkpoints.pop(name, None), stop_after=stop_after,
                      progress=progress, interrupt=interrupt, world=world, device=device)
        if not r["finished"] and r["interrupted"]:
            signum = interrupt.signum or signal.SIGTERM  # None: the signal reached another rank
            say(f"{signal.Signals(signum).name}: {name} checkpointed at step {r['step']} of {cfg['steps']} in "
                f"{out / f'{name}.ckpt'}; {resume_hint(out, world)}", file=sys.stderr)
            return 128 + signum
        if r["finished"]:
            say(f"  {r['groups']}")
            results[name] = r
        else:
            stopped[name] = r["step"]
    if stopped:
        at = ", ".join(f"{n} at step {s}" for n, s in stopped.items())
        say(f"--stop-after {stop_after}: stopped {at} of {cfg['steps']}; {resume_hint(out, world)}")
        return 0
    if not world.main:
        return 0
    params = next(iter(results.values()))["params"]
    print("\n" + table(results, cfg, entropy, world))
    files = plot(results, cfg, entropy, out, params)
    summary = {"config": cfg, "text": source, "unigram_entropy": entropy, "world_size": world.size,
               "results": {n: {k: v for k, v in r.items() if k != "finished"} for n, r in results.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {', '.join(str(f) for f in files)}, {out / 'summary.json'}")
    return 0
