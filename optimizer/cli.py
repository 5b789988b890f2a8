"""The command line: ``python -m optimizer demo | sweep | plot-schedule | bench | kernel-source | doctor``.

Bad flags or config values end with one line naming the key and the allowed
values, exit code 2, and no traceback.

Most of it turns each flag and config key into one checked setting with a one-line
error; the commands share those checks, so they stay in one file.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import math
import os
import pathlib
import re
import shlex
import sys
from collections.abc import Callable
from typing import Any

from . import timm_schedules
from .factory import OPTIMIZERS, ConfigError, keyword_defaults, load_config
from .hf_schedules import NAMES as _HF_NAMES
from .scheduler import SCHEDULES, HFScheduleLR, TimmScheduleLR, get_scheduler, make_schedule

HF_CURVES = tuple(n for n in _HF_NAMES if n not in ("reduce_lr_on_plateau", "greedy"))  # the ones with a curve

PROG = "python -m optimizer"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _demo_parser(sub) -> argparse.ArgumentParser:
    from .demo.train import DEFAULTS as D

    p = sub.add_parser(
        "demo", help="train a small LLaMA with each optimizer, print a table, write plots",
        description="Train a small LLaMA (RMSNorm, rotary, SwiGLU) on the Python reference docs, once per "
        "optimizer under warmup + a decay schedule; print a table and write loss.png, lr.png and summary.json "
        "into --out. Settings: the defaults, then --config, then the flags; with --resume, the checkpoint's. "
        "Ctrl-C writes a checkpoint and stops.",
        argument_default=argparse.SUPPRESS,
    )
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizers", nargs="+", choices=sorted(OPTIMIZERS), metavar="NAME",
                   help=f"which to train, from {sorted(OPTIMIZERS)} (default: {' '.join(D['optimizers'])})")
    for name, spec in OPTIMIZERS.items():
        # (an optimizer's other defaults, Muon's adamw_lr: set in a --config file's optimizer_args)
        others = "".join(f"; {k} {v}" for k, v in spec.options.items())
        g.add_argument(f"--{name}-lr", type=float, metavar="LR", help=f"{name} peak lr (default {spec.lr}{others})")
        g.add_argument(f"--{name}-weight-decay", type=float, metavar="WD",
                       help=f"{name} weight decay (default {spec.weight_decay})")
    g.add_argument("--lr-from", metavar="SWEEP_JSON", help="each optimizer at its best lr in a sweep's sweep.json")
    g.add_argument("--clip-grad-norm", type=float, metavar="N", help=f"clip the global grad norm, 0 = off "
                   f"(default {D['clip_grad_norm']})")
    g.add_argument("--state-dtype", choices=["fp32", "bf16", "uint8"], metavar="T",
                   help=f"states: fp32, bf16 or uint8 (8-bit) (default {D['state_dtype']})")
    g.add_argument("--param-dtype", choices=["fp32", "bf16"], metavar="T",
                   help=f"parameters: fp32 or bf16, no fp32 copy (default {D['param_dtype']})")
    g.add_argument("--stochastic-rounding", action="store_true",
                   help="round bf16 parameters stochastically")
    g = p.add_argument_group("schedule")
    g.add_argument("--schedule", choices=sorted(SCHEDULES), metavar="NAME",
                   help=f"one of {sorted(SCHEDULES)} (default {D['schedule']})")
    g.add_argument("--warmup-steps", type=int, metavar="N", help="default: --steps / 10")
    g.add_argument("--min-lr-ratio", type=float, metavar="R",
                   help="floor / peak (default 0.1, or 0 where the schedule has no floor)")
    g.add_argument("--steps", type=int, metavar="N", help=f"optimizer steps per run (default {D['steps']})")
    g = p.add_argument_group("model and data")
    for key in ("dim", "layers", "heads", "seq_len", "batch_size"):
        g.add_argument(f"--{key.replace('_', '-')}", type=int, metavar="N", help=f"default {D[key]}")
    g = p.add_argument_group("run")
    g.add_argument("--device", metavar="DEV", help=f"cpu, cuda, cuda:1, ... (default {D['device']})")
    g.add_argument("--distributed", choices=["none", "ddp", "fsdp2"],
                   help="under torchrun: DDP or FSDP2 (default: ddp under torchrun, else none)")
    g.add_argument("--seed", type=int, metavar="N", help=f"default {D['seed']}")
    g.add_argument("--out", metavar="DIR", help=f"output folder (default {D['out']})")
    g.add_argument("--eval-every", type=int, metavar="N", help="held-out loss every N steps (default: --steps / 6)")
    g.add_argument("--checkpoint-every", type=int, metavar="N", help="default: --steps / 6")
    again = g.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out, with its settings")
    again.add_argument("--overwrite", action="store_true",
                       help="start again in a non-empty --out (deletes the run's files there)")
    g.add_argument("--stop-after", type=int, metavar="N",
                   help="stop each optimizer after N steps of this invocation (checkpointed)")
    g.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings: keys as the flags with '_' "
                   "(adamw_lr), and optimizer_args: {name: {betas: [...]}}")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


RUN_ONLY = ("resume", "overwrite", "stop_after", "no_progress")  # this invocation's, not settings of the run


def _demo_flags() -> dict[str, argparse.Action]:
    """The demo's flags by config key (the flag with '_'): one source for the flags and the config files."""
    parser = argparse.ArgumentParser()
    demo_parser = _demo_parser(parser.add_subparsers())
    return {a.dest: a for a in demo_parser._actions if a.dest not in ("help", "config")}


def _number(value: Any, kind: type, name: str) -> int | float:
    """A number of a config file; numeric text counts too (YAML 1.1, PyYAML's, reads 1e-3 as a string)."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if (isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number)
            or (kind is int and number != int(number))):
        raise ConfigError(f"Invalid {name}: {value!r} (expected a {'whole ' if kind is int else ''}number)")
    return kind(number)


def _config_value(value: Any, action: argparse.Action, name: str) -> Any:
    """A value of a config file, checked as its flag's would be by argparse."""
    if action.nargs == "+":
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"Invalid {name}: {value!r} (expected a list of names)")
    elif action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise ConfigError(f"Invalid {name}: {value!r} (expected true or false)")
    elif action.type in (int, float):
        value = _number(value, action.type, name)
    elif not isinstance(value, str):
        raise ConfigError(f"Invalid {name}: {value!r} (expected text)")
    for v in value if isinstance(value, list) else [value]:
        if action.choices is not None and v not in action.choices:
            raise ConfigError(f"Invalid {name}: {v!r}; allowed values are {sorted(action.choices)}")
    return value


def _optimizer_args(value: Any, name: str) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or any(not isinstance(v, dict) for v in value.values()):
        raise ConfigError(f"Invalid {name}: {value!r}; expected {{name: {{lr: ..., ...}}}}")
    for key in value:
        if key not in OPTIMIZERS:
            raise ConfigError(f"Invalid {name}: {key!r}; allowed names are {sorted(OPTIMIZERS)}")
    return {k: dict(v) for k, v in value.items()}


def _demo_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings: the defaults, then (with --resume) the checkpoints', then the config file,
    then the flags; every value checked, and every error names the flag or config key it came from."""
    return _demo_plan(args)[0]


def _demo_plan(args: argparse.Namespace, hold: Callable[[pathlib.Path, str], None] | None = None
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's settings (see :func:`_demo_settings`) and this invocation's: resume, overwrite,
    stop_after, no_progress, the checkpoints to resume from, and how errors name each setting.
    ``hold(out, flag)`` is called once the run folder is known, before anything in it is read."""
    from .demo import train

    flags = _demo_flags()
    given = dict(vars(args))
    names = {k: "--" + k.replace("_", "-") for k in flags}  # how the errors name each setting
    path = given.pop("config", None)
    if path is not None:
        if not pathlib.Path(path).is_file():
            raise ConfigError(f"Invalid --config: {path!r} is not a file")
        for key, value in load_config(path).items():
            if key not in flags and key != "optimizer_args":
                raise ConfigError(f"Invalid config key {key!r} in {path}; allowed keys are "
                                  f"{sorted([*flags, 'optimizer_args'])}")
            if key not in given:  # flags win
                names[key] = f"{key} in {path}"
                given[key] = (_optimizer_args(value, names[key]) if key == "optimizer_args"
                              else _config_value(value, flags[key], names[key]))
    run = {k: given.pop(k) for k in RUN_ONLY if k in given}
    if run.get("resume") and run.get("overwrite"):
        raise ConfigError(f"Invalid {names['overwrite']}: not allowed with {names['resume']}")

    cfg = copy.deepcopy(train.DEFAULTS)
    out = pathlib.Path(given.get("out", cfg["out"]))
    if hold is not None:
        hold(out, names["out"])
    run["checkpoints"] = {}
    if run.get("resume"):
        run["checkpoints"] = _read_checkpoints(out, names)
        saved = next(iter(run["checkpoints"].values()))["config"]
        cfg.update({k: copy.deepcopy(v) for k, v in saved.items() if k in cfg})
    from_file = given.pop("optimizer_args", {})
    opt_args = {**cfg["optimizer_args"], **from_file}
    names.update({f"optimizer_args.{n}.{k}": f"optimizer_args.{n}.{k} in {path}" for n in from_file
                  for k in from_file[n]})
    if "lr_from" in given:  # each optimizer's best lr in a sweep; an lr given too would be ambiguous
        from .demo.sweep import best_lrs

        optimizers = given.get("optimizers", cfg["optimizers"])
        for name, lr in best_lrs(given["lr_from"], optimizers, names["lr_from"]).items():
            if f"{name}_lr" in given or "lr" in from_file.get(name, {}):
                label = names.get(f"{name}_lr", f"optimizer_args.{name}.lr in {path}")
                raise ConfigError(f"Invalid {label}: {name}'s lr comes from {names['lr_from']}; give one or the other")
            opt_args[name] = {**opt_args.get(name, {}), "lr": lr}
            names[f"optimizer_args.{name}.lr"] = names["lr_from"]
    for name in OPTIMIZERS:  # --adamw-lr, lion_weight_decay: ...
        for key in ("lr", "weight_decay"):
            if f"{name}_{key}" in given:
                opt_args[name] = {**opt_args.get(name, {}), key: given.pop(f"{name}_{key}")}
                names[f"optimizer_args.{name}.{key}"] = names[f"{name}_{key}"]
    cfg.update(given, optimizer_args=opt_args)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "distributed" not in given and cfg["distributed"] == "none" and world_size > 1:
        cfg["distributed"] = "ddp"
        run["note"] = f"torchrun started {world_size} processes: training with --distributed ddp"
    cfg = train.resolve_defaults(cfg)
    _check_settings(cfg, names, run, world_size)
    if run["checkpoints"]:
        _check_resume(cfg, run["checkpoints"], names, out)
    cfg["out"], run["names"] = str(out), names
    return cfg, run


def _read_checkpoints(out: pathlib.Path, names: dict[str, str]) -> dict[str, dict[str, Any]]:
    from .demo.train import read_checkpoints

    found = read_checkpoints(out, OPTIMIZERS)
    if not found:
        files = ", ".join(f"{n}.ckpt" for n in OPTIMIZERS)
        raise ConfigError(f"Invalid {names['resume']}: no checkpoint ({files}) in {names['out']} {str(out)!r}; "
                          "run without --resume to start")
    return found


def _check_settings(cfg: dict[str, Any], names: dict[str, str], run: dict[str, Any], world_size: int) -> None:
    import torch

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"Invalid {names[key]}: {why}")

    for key in ("steps", "batch_size", "seq_len", "dim", "layers", "heads", "eval_every", "checkpoint_every"):
        if cfg[key] < 1:
            raise bad(key, f"{cfg[key]} (must be >= 1)")
    if not 0 <= cfg["warmup_steps"] <= cfg["steps"]:
        raise bad("warmup_steps", f"{cfg['warmup_steps']} (must be in [0, {names['steps']} {cfg['steps']}])")
    if run.get("stop_after", 1) < 1:
        raise bad("stop_after", f"{run['stop_after']} (must be >= 1)")
    if cfg["dim"] % cfg["heads"] or (cfg["dim"] // cfg["heads"]) % 2:
        raise bad("dim", f"{cfg['dim']} does not split into {names['heads']} {cfg['heads']} heads of even width")
    if not 0 <= cfg["clip_grad_norm"] < math.inf:
        raise bad("clip_grad_norm", f"{cfg['clip_grad_norm']} (must be >= 0; 0 = off)")
    if cfg["stochastic_rounding"] and cfg["param_dtype"] != "bf16":
        raise bad("stochastic_rounding", f"it rounds bf16 parameters, and {names['param_dtype']} is "
                  f"{cfg['param_dtype']!r} (fp32 parameters round exactly); set it to 'bf16'")
    if len(set(cfg["optimizers"])) < len(cfg["optimizers"]):
        raise bad("optimizers", f"{cfg['optimizers']} (each at most once)")
    try:
        device = torch.device(cfg["device"])
    except RuntimeError:
        raise bad("device", f"{cfg['device']!r} (expected cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise bad("device", f"{cfg['device']!r}, but CUDA is not available here; use --device cpu")
    if cfg["distributed"] != "none" and "RANK" not in os.environ:
        raise bad("distributed", f"{cfg['distributed']!r} needs torchrun, e.g. torchrun --nproc_per_node 2 -m "
                  f"optimizer demo --distributed {cfg['distributed']}")
    if cfg["distributed"] == "none" and world_size > 1:
        raise bad("distributed", f"'none' under torchrun with {world_size} processes (each would write the same "
                  "files); use ddp or fsdp2")
    if cfg["batch_size"] % world_size:
        raise bad("batch_size", f"{cfg['batch_size']} does not split over {world_size} processes")
    from .demo.data import load_text, split

    held_out = len(split(load_text()[0])[1])
    if cfg["seq_len"] >= held_out - 1:
        raise bad("seq_len", f"{cfg['seq_len']} is longer than the held-out text ({held_out} bytes)")
    from .factory import create_optimizer

    dummy = [torch.zeros(2, 2, requires_grad=True)]
    for name, kwargs in cfg["optimizer_args"].items():  # built on a dummy tensor: a wrong value fails here
        takes = keyword_defaults(OPTIMIZERS[name].cls)
        numbers = _number_keywords(name)
        for key, value in kwargs.items():
            label = names.get(f"optimizer_args.{name}.{key}", f"optimizer_args.{name}.{key}")
            if key not in takes:
                raise ConfigError(f"Invalid {label}: {name!r} takes no {key!r}; it takes {sorted(takes)}")
            if key in numbers and not isinstance(value, (float, int)):  # numbers, betas
                value = (tuple(_number(v, float, label) for v in value) if isinstance(value, (list, tuple))
                         else _number(value, float, label))
            kwargs[key] = value
            try:
                create_optimizer(dummy, name, **{key: value})
            except ValueError as err:
                raise ConfigError(f"Invalid {label}: {str(err).removeprefix('Invalid ')}") from None
    if cfg["min_lr_ratio"] and "min_lr" not in inspect.signature(SCHEDULES[cfg["schedule"]]).parameters:
        raise bad("min_lr_ratio", f"{cfg['min_lr_ratio']}, but the {cfg['schedule']!r} schedule has no floor")
    try:
        get_scheduler(cfg["schedule"], None, warmup_steps=cfg["warmup_steps"], total_steps=cfg["steps"],
                      min_lr_ratio=cfg["min_lr_ratio"])
    except ValueError as err:
        raise ConfigError(_in_flags(str(err), {"warmup_steps": names["warmup_steps"], "total_steps": names["steps"],
                                               "min_lr_ratio": names["min_lr_ratio"]})) from None


def _number_keywords(name: str) -> set[str]:
    """The keywords of optimizer ``name`` that take numbers (or tuples of them, betas): those whose
    default is one, and those whose default is None but whose annotation is a number (Muon's
    ``adamw_lr: float | None``), so that a config file's ``1e-3`` (text to YAML 1.1) is read as one."""
    spec = OPTIMIZERS[name]
    numbers = {k for k, v in keyword_defaults(spec.cls).items() if isinstance(v, (float, tuple))}
    numbers |= {k for k, v in spec.options.items() if isinstance(v, float)}
    for klass in spec.cls.__mro__:
        if "__init__" in vars(klass):
            numbers |= {k for k, p in inspect.signature(klass.__init__).parameters.items()
                        if str(p.annotation).startswith(("float", "tuple[float"))}
    return numbers


def _effective(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments optimizer ``name`` is built with: ``kwargs`` over the registry's lr, weight
    decay and other options (Muon's ``adamw_lr``), over the class's defaults."""
    spec = OPTIMIZERS[name]
    return {**keyword_defaults(spec.cls), "lr": spec.lr, "weight_decay": spec.weight_decay, **spec.options,
            **kwargs}


def _check_resume(cfg: dict[str, Any], checkpoints: dict[str, dict[str, Any]], names: dict[str, str],
                  out: pathlib.Path) -> None:
    """The settings given with --resume must be those of the checkpoints; where it runs may change."""
    from .demo.train import FREE_ON_RESUME

    for name, ckpt in checkpoints.items():
        saved, path = ckpt["config"], out / f"{name}.ckpt"
        differ = []  # (how the user named it, the setting, what they gave, what the checkpoint has)
        for key in cfg:
            if key in FREE_ON_RESUME or key not in saved or saved[key] == cfg[key]:
                continue
            if key != "optimizer_args":
                differ.append((names[key], key, cfg[key], saved[key]))
                continue
            for opt in sorted({*cfg[key], *saved[key]}):
                ours, theirs = _effective(opt, cfg[key].get(opt, {})), _effective(opt, saved[key].get(opt, {}))
                for k in sorted({*ours, *theirs}):
                    if ours.get(k) != theirs.get(k):
                        at = f"optimizer_args.{opt}.{k}"
                        differ.append((names.get(at, at), at, ours.get(k), theirs.get(k)))
        if differ:
            given = ", ".join(f"{label} {ours!r}" for label, _, ours, _ in differ)
            has = ", ".join(f"{key} {theirs!r}" for _, key, _, theirs in differ)
            verb = "differs" if len(differ) == 1 else "differ"
            raise ConfigError(f"Invalid --resume: {given} {verb} from the checkpoint {path} (it has {has}); leave "
                              f"{'it' if len(differ) == 1 else 'them'} out to continue that run, or start over "
                              "with --overwrite")
        written = "none" if ckpt.get("format", "index") == "index" else "ddp or fsdp2"
        if (written == "none") != (cfg["distributed"] == "none"):
            raise ConfigError(f"Invalid {names['distributed']}: {cfg['distributed']!r}, but the checkpoint {path} "
                              f"was written with --distributed {written}; resume it that way")


def _check_out(out: pathlib.Path, names: dict[str, str], overwrite: bool) -> None:
    """A new run needs an empty folder (this run holds it, folder.py: so it exists), or --overwrite."""
    from .demo.folder import LOCK_NAME

    held = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
    if held and not overwrite:
        listed = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ConfigError(f"Invalid {names['out']}: {str(out)!r} already holds files ({listed}); add --resume "
                          "to continue its run, or --overwrite to start again")


def _in_flags(message: str, names: dict[str, str]) -> str:
    """A library's message with its keyword names replaced by how the user gave them."""
    pattern = r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b"
    return re.sub(pattern, lambda m: names[m[1]], message)


def demo(args: argparse.Namespace) -> int:
    from .demo import folder

    writer = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 writes the files
    with contextlib.ExitStack() as held:
        def hold(out: pathlib.Path, flag: str) -> None:  # Note [one run per folder] in demo/folder.py
            if writer:
                held.enter_context(folder.hold(out, flag))

        cfg, run = _demo_plan(args, hold)
        if not run["checkpoints"] and writer:
            _check_out(pathlib.Path(cfg["out"]), run["names"], run.get("overwrite", False))
        try:
            import matplotlib  # noqa: F401
            import tqdm  # noqa: F401
        except ImportError as err:
            raise ConfigError(f"the demo needs {err.name}: pip install 'clearoptim[demo]'") from None
        from .demo.train import run as train

        if "note" in run and writer:
            print(run["note"])
        return train(cfg, checkpoints=run["checkpoints"], overwrite=run.get("overwrite", False),
                     stop_after=run.get("stop_after"), progress=not run.get("no_progress", False))


# ---------------------------------------------------------------------------
# sweep
# ---------------------------------------------------------------------------

def _sweep_parser(sub) -> argparse.ArgumentParser:
    from .demo.sweep import DEFAULTS as D
    from .demo.sweep import GRID

    grid = ", ".join(f"{f:g}" for f in GRID)
    p = sub.add_parser(
        "sweep", help="held-out loss against the lr for each optimizer: a table, sweep.png, sweep.json",
        description="Short runs of the demo's model and data at a log grid of peak lrs per optimizer (the same "
        "seed and batches for every run); print each run's losses, each optimizer's best lr and the lrs within "
        "2%% of it, and write sweep.json (every run) and sweep.png into --out. Ctrl-C writes the finished runs; "
        "--resume runs the others. python -m optimizer demo --lr-from OUT/sweep.json then trains each "
        "optimizer at its best.", argument_default=argparse.SUPPRESS)
    p.add_argument("--optimizers", nargs="+", choices=sorted(OPTIMIZERS), metavar="NAME",
                   help=f"which to sweep, from {sorted(OPTIMIZERS)} (default: the demo's, {' '.join(D['optimizers'])})")
    p.add_argument("--lrs", nargs="+", metavar="NAME=LR,LR",
                   help=f"an optimizer's lrs, e.g. adamw=1e-3,3e-3,1e-2 (default: its registry lr times {grid}; "
                   "muon's is its matrices', its AdamW keeps the registry's)")
    p.add_argument("--seeds", type=int, metavar="N", help="runs per lr, seeds --seed, --seed + 1, ...: the figure "
                   f"draws their spread (default {D['seeds']})")
    p.add_argument("--seed", type=int, metavar="N", help=f"the first seed (default {D['seed']})")
    p.add_argument("--steps", type=int, metavar="N", help=f"steps per run (default {D['steps']})")
    p.add_argument("--schedule", choices=sorted(SCHEDULES), metavar="NAME", help=f"default {D['schedule']}")
    for key in ("dim", "layers", "heads", "seq_len", "batch_size"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, metavar="N", help=f"default {D[key]} (the demo's)")
    p.add_argument("--jobs", type=int, metavar="N", help="runs at a time, each a process with its share of the CPU "
                   "threads (default: 2 where torch has 2 threads or more, else 1)")
    p.add_argument("--out", metavar="DIR", help=f"output folder (default {D['out']})")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the sweep in --out: its settings, its "
                       "finished runs kept; --optimizers, --lrs and --seeds may add runs")
    again.add_argument("--overwrite", action="store_true", help="start again in --out (deletes its sweep.json, "
                       "sweep.png)")
    return p


def _parse_lrs(items: list[str], optimizers: list[str]) -> dict[str, list[float]]:
    lrs: dict[str, list[float]] = {}
    for item in items:
        name, _, values = item.partition("=")
        if name not in OPTIMIZERS:
            raise ConfigError(f"Invalid --lrs: {item!r}; expected NAME=LR,LR,... with NAME one of {sorted(OPTIMIZERS)}")
        if name not in optimizers:
            raise ConfigError(f"Invalid --lrs: {name!r} is not swept; add it to --optimizers {' '.join(optimizers)}")
        try:
            parsed = [float(v) for v in values.split(",")]
        except ValueError:
            raise ConfigError(f"Invalid --lrs: {item!r}; expected NAME=LR,LR,... with numbers") from None
        if not all(math.isfinite(v) and v > 0 for v in parsed):
            raise ConfigError(f"Invalid --lrs: {item!r}; each lr must be a number > 0")
        if name in lrs:
            raise ConfigError(f"Invalid --lrs: {name!r} given twice")
        lrs[name] = sorted(set(parsed))
    return lrs


def _sweep_plan(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """The sweep's settings (its defaults, then with --resume sweep.json's, then the flags), the finished
    runs to keep, and this invocation's (jobs, threads); every error names its flag."""
    import torch

    from .demo import sweep

    given = dict(vars(args))
    resume, overwrite = given.pop("resume", False), given.pop("overwrite", False)
    jobs = given.pop("jobs", None)
    settings = copy.deepcopy(sweep.DEFAULTS)
    out = pathlib.Path(given.get("out", settings["out"]))
    runs: list[dict[str, Any]] = []
    if resume:
        saved = sweep.read(out / "sweep.json", "--resume")
        differ = [k for k in sweep.RUN_KEYS if k in given and given[k] != saved["config"].get(k)]
        if differ:
            flags = ", ".join(f"--{k.replace('_', '-')} {given[k]!r}" for k in differ)
            has = ", ".join(f"{k} {saved['config'].get(k)!r}" for k in differ)
            raise ConfigError(f"Invalid --resume: {flags} {'differs' if len(differ) == 1 else 'differ'} from the sweep "
                              f"in {out / 'sweep.json'} (it has {has}); leave {'it' if len(differ) == 1 else 'them'} "
                              "out to continue it, or start over with --overwrite")
        settings.update({k: v for k, v in saved["config"].items() if k in settings})
        runs = saved["runs"]
    elif (out / "sweep.json").exists() and not overwrite:
        raise ConfigError(f"Invalid --out: {str(out)!r} already holds a sweep (sweep.json); add --resume to continue "
                          "it (its finished runs are kept), or --overwrite to start again")
    lrs = given.pop("lrs", None)
    settings.update(given)
    settings["out"] = str(out)
    if len(set(settings["optimizers"])) < len(settings["optimizers"]):
        raise ConfigError(f"Invalid --optimizers: {settings['optimizers']} (each at most once)")
    if lrs is not None:
        settings["lrs"] = {**settings["lrs"], **_parse_lrs(lrs, settings["optimizers"])}
    for flag, value, least in (("--seeds", settings["seeds"], 1), ("--seed", settings["seed"], 0),
                               ("--jobs", 1 if jobs is None else jobs, 1)):
        if value < least:
            raise ConfigError(f"Invalid {flag}: {value} (must be >= {least})")
    # the runs' own settings, checked as the demo checks them (its messages name the same flags)
    cfg = sweep.run_config(settings, settings["optimizers"][0], 1.0, settings["seed"])
    _check_settings(cfg, {k: "--" + k.replace("_", "-") for k in cfg}, {}, 1)
    threads = torch.get_num_threads()
    jobs = jobs if jobs is not None else (2 if threads >= 2 else 1)
    return settings, runs, {"jobs": jobs, "threads": max(1, threads // jobs), "overwrite": overwrite}


def sweep(args: argparse.Namespace) -> int:
    from .demo import folder
    from .demo import sweep as sweeps

    out = pathlib.Path(getattr(args, "out", sweeps.DEFAULTS["out"]))
    with folder.hold(out, "--out"):  # Note [one run per folder] in demo/folder.py
        settings, runs, how = _sweep_plan(args)
        try:
            import matplotlib  # noqa: F401
        except ImportError as err:
            raise ConfigError(f"the sweep needs {err.name}: pip install 'clearoptim[demo]'") from None
        if how["overwrite"]:
            for file in sweeps.FILES:
                (out / file).unlink(missing_ok=True)
        return sweeps.run(settings, runs, jobs=how["jobs"], threads=how["threads"])


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
    floor_flag = "--min-lr-ratio" if args.min_lr_ratio is not None else "--min-lr"
    if args.output:  # checked first: nothing is computed for a picture that cannot be written
        try:
            import matplotlib
        except ImportError:
            raise ConfigError("Invalid -o/--output: a PNG needs matplotlib (pip install 'clearoptim[demo]'); "
                              "without -o the schedule is printed as text") from None
        folder = pathlib.Path(args.output).absolute().parent
        if not folder.is_dir():
            raise ConfigError(f"Invalid -o/--output: {args.output!r}: the folder {str(folder)!r} does not exist")
    if args.like != "ours" and (args.min_lr is not None or args.min_lr_ratio is not None):
        raise ConfigError(f"Invalid {floor_flag}: with --like {args.like}, give the floor by the library's own "
                          "keyword, e.g. --set min_lr_rate=0.1 (transformers) or --set lr_min=1e-5 (timm)")
    # the library's keywords, as the user gave them
    names = {k: f"--set {k}" for k in options} | {
        "warmup_steps": "--warmup-steps", "num_warmup_steps": "--warmup-steps", "warmup_t": "--warmup-steps",
        "total_steps": "--total-steps", "num_training_steps": "--total-steps", "t_initial": "--total-steps",
        "peak_lr": "--peak-lr", "min_lr": floor_flag}
    try:
        if args.like == "transformers":
            if args.name not in HF_CURVES:
                raise ConfigError(f"Invalid NAME: {args.name!r}; with --like transformers one of {sorted(HF_CURVES)}")
            sched = HFScheduleLR(None, args.name, w, t, peak_lr=peak, **options)
            label = "Hugging Face transformers' curve"
        elif args.like == "timm":
            if args.name not in timm_schedules.NAMES:
                raise ConfigError(f"Invalid NAME: {args.name!r}; with --like timm one of "
                                  f"{sorted(timm_schedules.NAMES)}")
            steps_kw = {"t_initial": t} if args.name in ("cosine", "tanh", "poly", "wsd") else {}
            sched = TimmScheduleLR(None, args.name, peak_lr=peak, warmup_t=w, **steps_kw, **options)
            label = "timm's curve"
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
                raise ConfigError(f"Invalid {floor_flag}: schedule {args.name!r} has no floor")
            sched = make_schedule(args.name, **kwargs)
            label = "this library's curve"

        def fn(step: int) -> float:
            return sched(step) if callable(sched) else sched.get_lr(step)

        steps = list(range(max(t, w) + max(1, t // 10) + 1))
        lrs = [fn(s) for s in steps]  # some options are only used, and checked, here
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # the library's checks, in its keywords
        message = _in_flags(str(err), names)
        if message == str(err) and args.set:  # it names no keyword: one of the options, as given
            message = f"Invalid --set {' '.join(args.set)}: {err}"
        raise ConfigError(message) from None
    values = f"lr(0) = {fn(0):.4g}   lr({w}) end of warmup = {fn(w):.4g}   lr({t}) end = {fn(t):.4g}"
    keys = f"{label}: {values}"
    if args.output:
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(steps, lrs)
        ax.axvline(w, color="gray", ls=":", lw=0.8)
        ax.axvline(t, color="gray", ls=":", lw=0.8)
        ax.set(xlabel="step", ylabel="learning rate")
        ax.set_title(f"learning rate of the {args.name!r} schedule ({label})\n{values}", fontsize=9)
        fig.tight_layout()
        try:
            fig.savefig(args.output, dpi=120)
        except (OSError, ValueError) as err:  # not writable; a suffix matplotlib does not know
            raise ConfigError(f"Invalid -o/--output: {args.output!r}: {err}") from None
        finally:
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
    from .bench import MODELS, SPARSE_MODELS

    p = sub.add_parser("bench", help="time every optimizer backend and the peers side by side",
                       description="Median step time of our backends (8-bit states and bf16 parameters with "
                       "stochastic rounding too), torch.optim.AdamW and (when installed) lion-pytorch, bitsandbytes "
                       "and torchao's AdamW8bit on one parameter list, with the bytes each moves and holds per "
                       "parameter, GB/s, the fractions of the copy and in-place bandwidths measured in the same run, "
                       "and ratios to torch's AdamW; peers that cannot run here are listed as skipped. Where the "
                       "list has hidden matrices, our Muon against torch.optim.Muon + torch's fused AdamW, with the "
                       "Newton-Schulz iteration's GFLOP/s and its fraction of a matmul measured in the same run.")
    p.add_argument("--device", default=None, metavar="DEV", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help=f"parameter list: one of {sorted(MODELS)}, or many-small (both small-* lists) "
                   "(default gpt2-30m on CPU, llama-1.1b on CUDA), "
                   "or module:function returning your nn.Module; or a sparse embedding table for "
                   f"SparseAdamW, one of {sorted(SPARSE_MODELS)}")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="parameter dtype (default fp32)")
    p.add_argument("--state-dtype", default=None, choices=["fp32", "bf16"],
                   help="our optimizers' state dtype (default: fp32; torch's keeps the parameter dtype)")
    p.add_argument("--reps", type=int, default=10, metavar="N", help="timed steps per implementation (default 10)")
    p.add_argument("--only", nargs="+", metavar="TEXT", help="only implementations whose name contains TEXT")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--readme", metavar="NAME",
                   help="deprecated: the package no longer rewrites files. Writes the JSON (to --json FILE, else "
                   "./NAME.json) and prints the command that puts it in the tables: python tools/bench_tables.py "
                   "NAME=FILE, run in a clone of the repository")
    p.add_argument("--from-json", metavar="FILE",
                   help="deprecated: prints the Markdown table of FILE (written by --json) instead of measuring; "
                   "python tools/bench_tables.py FILE writes it into the repository's README and docs")
    p.add_argument("--compile", action="store_true",
                   help="also time each of ours and torch's AdamW with torch.compile(opt.step), with the ratio "
                   "to the same implementation in eager mode")
    return p


def bench(args: argparse.Namespace, argv: list[str]) -> int:
    """``argv``: the command line as given, which the JSON records (the tables show it)."""
    import torch

    from .bench import run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"Invalid --device: {device!r}, but CUDA is not available here; use --device cpu")
    if args.reps < 1:
        raise ConfigError(f"Invalid --reps: {args.reps} (must be >= 1)")
    model = args.model or ("gpt2-30m" if device == "cpu" else "llama-1.1b")
    # Deprecated flags (the file-rewriting moved to the repository's tools/bench_tables.py): accepted,
    # one warning line each, and the nearest thing that writes no file but a JSON one.
    if args.from_json is not None:
        from .bench import load_results, markdown

        if not pathlib.Path(args.from_json).is_file():
            raise ConfigError(f"Invalid --from-json: {args.from_json!r} is not a file")
        try:
            table = markdown(load_results(args.from_json))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"Invalid --from-json: {err}") from None
        name = f"{args.readme}=" if args.readme else ""
        _deprecated("--from-json", f"python tools/bench_tables.py {name}{args.from_json}")
        print(table)
        return 0
    json_path = args.json
    if args.readme is not None:
        if not re.fullmatch(r"[\w-]+", args.readme):
            raise ConfigError(f"Invalid --readme: {args.readme!r} (a table name: letters, digits, - and _)")
        json_path = json_path or f"{args.readme}.json"
        if args.json is None and pathlib.Path(json_path).exists():  # checked before minutes of measuring
            raise ConfigError(f"Invalid --readme: {json_path} exists and is not overwritten; pass --json FILE")
        _deprecated("--readme", f"--json FILE, then python tools/bench_tables.py {args.readme}=FILE")
    done = run(model, device, args.reps, args.only, json_path, dtype=args.dtype, state_dtype=args.state_dtype,
               compile=args.compile, command=f"{PROG} {shlex.join(argv)}")
    if args.readme is not None:
        print(f"to put it in the tables, in a clone of the repository: python tools/bench_tables.py "
              f"{args.readme}={json_path}")
    return done


def _deprecated(flag: str, instead: str) -> None:
    print(f"{PROG} bench: warning: {flag} is deprecated (the package no longer rewrites files); "
          f"use {instead}", file=sys.stderr)


def _kernel_source_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("kernel-source", help="print the C source of an optimizer's fused CPU kernel",
                       description="The translation unit that the fused CPU backend compiles for an optimizer: "
                       "optimizer/csrc/fused_prelude.h, the algorithm's update (written beside its Python "
                       "reference) and optimizer/csrc/fused_loop.c once per dtype variant; for the 8-bit "
                       "states (adamw8bit, lion8bit) also csrc/8bit_prelude.h and csrc/8bit_loop.c.")
    p.add_argument("name", choices=["adamw", "lion", "adamw8bit", "lion8bit"], help="the optimizer's kernel")
    return p


def kernel_source(args: argparse.Namespace) -> int:
    from . import _fused_cpu
    from .adamw import AdamW
    from .lion import Lion

    cls = {"adamw": AdamW, "lion": Lion}[args.name.removesuffix("8bit")]
    backends = cls.backends_8bit if args.name.endswith("8bit") else cls.backends
    print(_fused_cpu.source(backends.c_kernel), end="")
    return 0


def _doctor_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("doctor", help="versions, and which backend runs what here, checked against the reference",
                       description="Print Python, torch, Triton and the C toolchain, then for each device, "
                       "algorithm, state format and parameter dtype: which backends are available (or why not), "
                       "which one the default picks, and whether each agrees with the reference on a small probe. "
                       "Exit status 1 when a backend that the default picks disagrees.")
    p.add_argument("--device", choices=["cpu", "cuda"], help="check only this device (default: cpu, and cuda if "
                   "available)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    return p


def doctor(args: argparse.Namespace) -> int:
    import torch

    from .doctor import run

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("Invalid --device: 'cuda', but CUDA is not available here; use --device cpu")
    return run([args.device] if args.device else None, json_output=args.json)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog=PROG, description="AdamW, Lion and learning-rate schedules for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    _demo_parser(sub)
    _sweep_parser(sub)
    _plot_parser(sub)
    _bench_parser(sub)
    _kernel_source_parser(sub)
    _doctor_parser(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    command = args.__dict__.pop("command")
    say = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)  # under torchrun: rank 0
    try:
        return {"demo": demo, "sweep": sweep, "plot-schedule": plot_schedule, "bench": lambda a: bench(a, argv),
                "kernel-source": kernel_source, "doctor": doctor}[command](args)
    except ValueError as err:  # ConfigError and the library's argument checks: the user's input
        say(f"{PROG} {command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the disk or the file system, mid-run (a full disk, a folder removed)
        say(f"{PROG} {command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the training loop, or a second Ctrl-C inside it
        say(f"{PROG} {command}: interrupted", file=sys.stderr)
        return 130
