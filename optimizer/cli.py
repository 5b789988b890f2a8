"""The command line: ``python -m optimizer demo | plot-schedule | bench``.

Bad flags or config values end with one line naming the key and the allowed
values, exit code 2, and no traceback.
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

from .factory import OPTIMIZERS, ConfigError, load_config
from . import timm_schedules
from .hf_schedules import NAMES as _HF_NAMES
from .scheduler import SCHEDULES, HFScheduleLR, TimmScheduleLR, make_schedule

HF_CURVES = tuple(n for n in _HF_NAMES if n not in ("reduce_lr_on_plateau", "greedy"))  # the ones with a curve

PROG = "python -m optimizer"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _demo_parser(sub) -> argparse.ArgumentParser:
    from .demo.train import DEFAULTS as D

    p = sub.add_parser(
        "demo", help="train a small LLaMA with AdamW and Lion, print a table, write plots",
        description="Train a small LLaMA (RMSNorm, rotary, SwiGLU) on the Python reference docs that ship with "
        "Python, once per optimizer under warmup + a decay schedule; print a table and write loss.png, lr.png "
        "and summary.json into --out. Settings come from the defaults, then --config, then the flags.",
        argument_default=argparse.SUPPRESS,
    )
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizers", nargs="+", choices=sorted(OPTIMIZERS), metavar="NAME",
                   help=f"which to train, from {sorted(OPTIMIZERS)} (default: {' '.join(D['optimizers'])})")
    for name, spec in OPTIMIZERS.items():
        g.add_argument(f"--{name}-lr", type=float, metavar="LR", help=f"{name} peak lr (default {spec.lr})")
        g.add_argument(f"--{name}-weight-decay", type=float, metavar="WD",
                       help=f"{name} weight decay (default {spec.weight_decay})")
    g.add_argument("--clip-grad-norm", type=float, metavar="N", help=f"clip the global grad norm, 0 = off "
                   f"(default {D['clip_grad_norm']})")
    g = p.add_argument_group("schedule")
    g.add_argument("--schedule", choices=sorted(SCHEDULES), metavar="NAME",
                   help=f"one of {sorted(SCHEDULES)} (default {D['schedule']})")
    g.add_argument("--warmup-steps", type=int, metavar="N", help=f"default {D['warmup_steps']}")
    g.add_argument("--min-lr-ratio", type=float, metavar="R", help=f"floor / peak (default {D['min_lr_ratio']})")
    g.add_argument("--steps", type=int, metavar="N", help=f"optimizer steps per run (default {D['steps']})")
    g = p.add_argument_group("model and data")
    for key in ("dim", "layers", "heads", "seq_len", "batch_size"):
        g.add_argument(f"--{key.replace('_', '-')}", type=int, metavar="N", help=f"default {D[key]}")
    g = p.add_argument_group("run")
    g.add_argument("--device", metavar="DEV", help=f"cpu, cuda, cuda:1, ... (default {D['device']})")
    g.add_argument("--distributed", choices=["none", "ddp", "fsdp2"],
                   help="under torchrun: DDP or FSDP2 over the processes, gloo on CPU, nccl on CUDA "
                   f"(default {D['distributed']})")
    g.add_argument("--seed", type=int, metavar="N", help=f"default {D['seed']}")
    g.add_argument("--out", metavar="DIR", help=f"output folder (default {D['out']})")
    g.add_argument("--eval-every", type=int, metavar="N", help=f"held-out loss every N steps (default {D['eval_every']})")
    g.add_argument("--checkpoint-every", type=int, metavar="N", help=f"default {D['checkpoint_every']}")
    g.add_argument("--resume", action="store_true", help="continue the runs checkpointed in --out")
    g.add_argument("--stop-after", type=int, metavar="N", help="stop after N steps of this invocation (checkpointed)")
    g.add_argument("--config", metavar="FILE", help="YAML or JSON file of these settings (keys as the flags, "
                   "with '_'; optimizer_args: {name: {lr: ..., betas: [...]}})")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _demo_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the config file, then the flags; every key and value checked."""
    from .demo.train import DEFAULTS

    cfg = copy.deepcopy(DEFAULTS)
    flags = vars(args)
    if "config" in flags:
        data = load_config(flags["config"])
        unknown = sorted(set(data) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"Invalid config key {unknown[0]!r}; allowed keys are {sorted(DEFAULTS)}")
        cfg.update(data)
    for name in OPTIMIZERS:
        for key in ("lr", "weight_decay"):
            flag = f"{name}_{key}"
            if flag in flags:
                cfg["optimizer_args"] = {**cfg["optimizer_args"], name: {**cfg["optimizer_args"].get(name, {}),
                                                                         key: flags[flag]}}
    cfg.update({k: v for k, v in flags.items() if k in DEFAULTS})
    _check_settings(cfg, DEFAULTS)
    return cfg


def _check_settings(cfg: dict[str, Any], defaults: dict[str, Any]) -> None:
    for key, default in defaults.items():
        value = cfg[key]
        if isinstance(default, bool) or isinstance(default, (int, float)):
            kind = int if isinstance(default, int) else (int, float)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ConfigError(f"Invalid {key}: {value!r} (expected a {'whole ' if kind is int else ''}number)")
    for key in ("steps", "batch_size", "seq_len", "dim", "layers", "heads", "eval_every", "checkpoint_every"):
        if cfg[key] < 1:
            raise ConfigError(f"Invalid {key}: {cfg[key]} (must be >= 1)")
    if not isinstance(cfg["optimizers"], list) or not cfg["optimizers"]:
        raise ConfigError(f"Invalid optimizers: {cfg['optimizers']!r}; allowed values are {sorted(OPTIMIZERS)}")
    for name in cfg["optimizers"]:
        if name not in OPTIMIZERS:
            raise ConfigError(f"Invalid optimizers: {name!r}; allowed values are {sorted(OPTIMIZERS)}")
    if cfg["distributed"] not in ("none", "ddp", "fsdp2"):
        raise ConfigError(f"Invalid distributed: {cfg['distributed']!r}; allowed values are ['ddp', 'fsdp2', 'none']")
    if cfg["schedule"] not in SCHEDULES:
        raise ConfigError(f"Invalid schedule: {cfg['schedule']!r}; allowed values are {sorted(SCHEDULES)}")
    args = cfg["optimizer_args"]
    if not isinstance(args, dict) or any(k not in OPTIMIZERS or not isinstance(v, dict) for k, v in args.items()):
        raise ConfigError(f"Invalid optimizer_args: {args!r}; expected {{name: {{lr: ..., ...}}}} with names "
                          f"from {sorted(OPTIMIZERS)}")
    for name, kwargs in args.items():  # build once on a dummy tensor: a wrong key or value fails here, not mid-run
        import torch

        from .factory import create_optimizer

        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        args[name] = kwargs
        create_optimizer([torch.zeros(2, 2, requires_grad=True)], name, **kwargs)
    make_schedule(cfg["schedule"], warmup_steps=cfg["warmup_steps"], total_steps=cfg["steps"])
    if not 0 <= cfg["min_lr_ratio"] <= 1:
        raise ConfigError(f"Invalid min_lr_ratio: {cfg['min_lr_ratio']} (must be in [0, 1])")


def demo(args: argparse.Namespace) -> int:
    cfg = _demo_settings(args)
    if cfg["device"].startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"Invalid device: {cfg['device']!r}, but CUDA is not available here; use --device cpu")
    try:
        import matplotlib  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"the demo needs {err.name}: pip install 'clearoptim[demo]'") from None
    from .demo.train import run

    vars_ = vars(args)
    return run(cfg, resume=vars_.get("resume", False), stop_after=vars_.get("stop_after"),
               progress=not vars_.get("no_progress", False))


# ---------------------------------------------------------------------------
# plot-schedule
# ---------------------------------------------------------------------------

def _plot_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plot-schedule", help="draw a learning-rate schedule (PNG, or text without -o)",
                       description="Draw a schedule, ours or as Hugging Face's or timm's get_scheduler would give it. "
                       "Without -o, print a text rendering and the key values.")
    p.add_argument("name", metavar="NAME",
                   help=f"ours: {sorted(SCHEDULES)}; with --like transformers: {sorted(HF_CURVES)}; "
                   f"with --like timm: {sorted(timm_schedules.NAMES)}")
    p.add_argument("--like", choices=["ours", "transformers", "timm"], default="ours",
                   help="whose conventions: ours (default; warmup (s+1)/(W+1)), transformers' (warmup s/W) or "
                   "timm's (warmup over the start of the curve, --total-steps is one cycle)")
    p.add_argument("--warmup-steps", type=int, default=100, metavar="N",
                   help="default 100 (transformers: num_warmup_steps; timm: warmup_t)")
    p.add_argument("--total-steps", type=int, default=1000, metavar="N",
                   help="default 1000 (transformers: num_training_steps; timm: t_initial)")
    p.add_argument("--peak-lr", type=float, default=1e-3, metavar="LR", help="default 1e-3")
    floor = p.add_mutually_exclusive_group()
    floor.add_argument("--min-lr", type=float, metavar="LR", help="absolute floor (default 0)")
    floor.add_argument("--min-lr-ratio", type=float, metavar="R", help="floor as a fraction of the peak")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a schedule option by its own library's name, e.g. num_cycles=3, power=2, "
                   "decay_type=cosine, min_lr_rate=0.1 (transformers), lr_min=1e-5 (timm)")
    p.add_argument("-o", "--output", metavar="PNG", help="write a picture here instead of printing")
    return p


def _option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"Invalid --set {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    return key, raw


def plot_schedule(args: argparse.Namespace) -> int:
    options: dict[str, Any] = dict(_option(s) for s in args.set)
    w, t, peak = args.warmup_steps, args.total_steps, args.peak_lr
    if args.like != "ours" and (args.min_lr is not None or args.min_lr_ratio is not None):
        flag = "--min-lr" if args.min_lr is not None else "--min-lr-ratio"
        raise ConfigError(f"Invalid {flag}: with --like {args.like}, give the floor by the library's own keyword, "
                          "e.g. --set min_lr_rate=0.1 (transformers) or --set lr_min=1e-5 (timm)")
    if args.like == "transformers":
        if args.name not in HF_CURVES:
            raise ConfigError(f"Invalid NAME: {args.name!r}; with --like transformers one of {sorted(HF_CURVES)}")
        sched = HFScheduleLR(None, args.name, w, t, peak_lr=peak, **options)
        label = "as transformers' get_scheduler"
    elif args.like == "timm":
        if args.name not in timm_schedules.NAMES:
            raise ConfigError(f"Invalid NAME: {args.name!r}; with --like timm one of {sorted(timm_schedules.NAMES)}")
        steps_kw = {"t_initial": t} if args.name in ("cosine", "tanh", "poly", "wsd") else {}
        sched = TimmScheduleLR(None, args.name, peak_lr=peak, warmup_t=w, **steps_kw, **options)
        label = "as timm's scheduler"
    else:
        if args.name not in SCHEDULES:
            raise ConfigError(f"Invalid NAME: {args.name!r}; one of {sorted(SCHEDULES)} (or use --like)")
        kwargs = dict(options, peak_lr=peak, warmup_steps=w, total_steps=t)
        if args.min_lr_ratio is not None:
            if not 0 <= args.min_lr_ratio <= 1:
                raise ConfigError(f"Invalid --min-lr-ratio: {args.min_lr_ratio} (must be in [0, 1])")
            kwargs["min_lr"] = args.min_lr_ratio * peak
        elif args.min_lr is not None:
            kwargs["min_lr"] = args.min_lr
        if "min_lr" in kwargs and args.name in ("constant", "inverse_sqrt"):
            flag = "--min-lr-ratio" if args.min_lr_ratio is not None else "--min-lr"
            raise ConfigError(f"Invalid {flag}: schedule {args.name!r} has no floor")
        sched = make_schedule(args.name, **kwargs)
        label = "ours"

    def fn(step: int) -> float:
        return sched(step) if callable(sched) else sched.get_lr(step)

    last = max(args.total_steps, args.warmup_steps) + max(1, args.total_steps // 10)
    steps = list(range(last + 1))
    lrs = [fn(s) for s in steps]
    w, t = args.warmup_steps, args.total_steps
    keys = f"{label}: lr(0) = {fn(0):.4g}   lr({w}) end of warmup = {fn(w):.4g}   lr({t}) end = {fn(t):.4g}"
    if args.output:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(steps, lrs)
        ax.axvline(w, color="gray", ls=":", lw=0.8)
        ax.axvline(t, color="gray", ls=":", lw=0.8)
        ax.set(xlabel="step", ylabel="learning rate", title=f"{args.name}: {keys}")
        ax.title.set_fontsize(8)
        fig.tight_layout()
        fig.savefig(args.output, dpi=120)
        plt.close(fig)
        print(f"wrote {args.output}; {keys}")
    else:
        print(render_text(lrs))
        print(keys)
    return 0


def render_text(values: list[float], width: int = 64, height: int = 12) -> str:
    """A compact character plot: one column per bucket of steps, the top row the maximum."""
    top = max(values) or 1.0
    cols = [values[min(len(values) - 1, round(i * (len(values) - 1) / (width - 1)))] for i in range(width)]
    rows = []
    for r in range(height, 0, -1):
        level = top * (r - 0.5) / height
        label = f"{top * r / height:9.2e} |" if r in (height, 1) or r == height // 2 else " " * 10 + "|"
        rows.append(label + "".join("#" if v >= level else " " for v in cols))
    rows.append(" " * 10 + "+" + "-" * width)
    rows.append(" " * 11 + f"0{'step':^{width - 2 * len(str(len(values) - 1))}}{len(values) - 1}")
    return "\n".join(rows)


def _bench_parser(sub) -> argparse.ArgumentParser:
    from .bench import MODELS

    p = sub.add_parser("bench", help="time every optimizer backend and the peers side by side",
                       description="Median step time of our backends, torch.optim.AdamW and (when installed) "
                       "lion-pytorch and bitsandbytes on one parameter list, with GB/s, the fractions of the "
                       "copy and in-place bandwidths measured in the same run, and ratios to torch's AdamW.")
    p.add_argument("--device", default=None, metavar="DEV", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help=f"parameter list: one of {sorted(MODELS)} (default gpt2-30m on CPU, llama-1.1b on CUDA), "
                   "or module:function returning your nn.Module")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="parameter dtype (default fp32)")
    p.add_argument("--state-dtype", default=None, choices=["fp32", "bf16"],
                   help="our optimizers' state dtype (default: fp32; torch's keeps the parameter dtype)")
    p.add_argument("--reps", type=int, default=10, metavar="N", help="timed steps per implementation (default 10)")
    p.add_argument("--only", nargs="+", metavar="TEXT", help="only implementations whose name contains TEXT")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--compile", action="store_true",
                   help="also time each of ours and torch's AdamW with torch.compile(opt.step), with the ratio "
                   "to the same implementation in eager mode")
    return p


def bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"Invalid --device: {device!r}, but CUDA is not available here; use --device cpu")
    if args.reps < 1:
        raise ConfigError(f"Invalid --reps: {args.reps} (must be >= 1)")
    model = args.model or ("gpt2-30m" if device == "cpu" else "llama-1.1b")
    return run(model, device, args.reps, args.only, args.json, dtype=args.dtype, state_dtype=args.state_dtype,
               compile=args.compile)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog=PROG, description="AdamW, Lion and learning-rate schedules for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    _demo_parser(sub)
    _plot_parser(sub)
    _bench_parser(sub)
    args = parser.parse_args(argv)
    command = args.__dict__.pop("command")
    try:
        return {"demo": demo, "plot-schedule": plot_schedule, "bench": bench}[command](args)
    except ValueError as err:  # ConfigError and the library's argument checks: the user's input
        print(f"{PROG} {command}: error: {err}", file=sys.stderr)
        return 2
