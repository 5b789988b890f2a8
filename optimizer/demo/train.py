"""Train the small LLaMA once per optimizer, with checkpoints that resume exactly,
then write the table, ``loss.png``, ``lr.png`` and ``summary.json``."""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import time
from typing import Any

import torch

from ..factory import clip_grad_norm_, create_optimizer, create_scheduler, describe_groups
from . import parallel
from .data import Batches, load_text, split, unigram_entropy
from .llama import Llama

# Every setting of the demo with its default; the CLI flags, the config file's keys
# and the summary's "config" are these names.
DEFAULTS: dict[str, Any] = {
    "optimizers": ["adamw", "lion"],
    "schedule": "cosine",
    "warmup_steps": 30,
    "min_lr_ratio": 0.1,
    "steps": 300,
    "batch_size": 16,
    "seq_len": 128,
    "dim": 256,
    "layers": 4,
    "heads": 4,
    "clip_grad_norm": 1.0,
    "eval_every": 50,
    "checkpoint_every": 50,
    "device": "cpu",
    "distributed": "none",  # under torchrun: "ddp" or "fsdp2" (parallel.py)
    "seed": 0,
    "out": "runs/demo",
    "optimizer_args": {},  # name -> keyword arguments (lr, weight_decay, betas, ...)
}
# the settings that must match when a run is resumed
SHAPING = ("schedule", "warmup_steps", "min_lr_ratio", "steps", "batch_size", "seq_len", "dim", "layers", "heads",
           "clip_grad_norm", "seed")


def save_atomic(obj: Any, path: pathlib.Path) -> None:
    """Write ``obj`` with torch.save so that ``path`` is either the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(model: Llama, held_out: torch.Tensor, seq_len: int, device: torch.device, windows: int = 48) -> float:
    """Mean loss over fixed windows spread evenly over the held-out text (no randomness)."""
    model.eval()
    starts = torch.linspace(0, len(held_out) - seq_len - 1, windows).long().tolist()
    rows = torch.stack([held_out[s : s + seq_len + 1] for s in starts]).long().to(device)
    _, loss = model(rows[:, :-1], rows[:, 1:])
    model.train()
    return loss.item()


def train_one(name: str, cfg: dict[str, Any], train_data, held_out, out: pathlib.Path, *, resume: bool,
              stop_after: int | None, progress: bool, world: parallel.World, device: torch.device) -> dict[str, Any]:
    """One optimizer's run; returns its results (``finished`` False if stopped early)."""
    torch.manual_seed(cfg["seed"])
    model = Llama(dim=cfg["dim"], layers=cfg["layers"], heads=cfg["heads"], max_seq=cfg["seq_len"]).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    model = parallel.wrap(model, world)
    opt = create_optimizer(model, name, **cfg["optimizer_args"].get(name, {}))
    ckpt_format = "index" if world.mode == "none" else "full"  # opt.state_dict() / unsharded, by parameter name
    sched = create_scheduler(opt, cfg["schedule"], warmup_steps=cfg["warmup_steps"], total_steps=cfg["steps"],
                             min_lr_ratio=cfg["min_lr_ratio"])
    batches = Batches(train_data, cfg["batch_size"], cfg["seq_len"], cfg["seed"])
    hist: dict[str, list] = {"loss": [], "lr": [], "held_out": [], "step_ms": [], "wall_s": []}
    start, ckpt_path = 0, out / f"{name}.ckpt"
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=True, map_location=device)
        saved = ckpt["config"]
        changed = [k for k in SHAPING if saved.get(k) != cfg[k]]
        if changed:
            have = ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
            raise ValueError(f"Invalid --resume: {changed} differ from the checkpoint {ckpt_path} (it has {have})")
        if ckpt.get("format", "index") != ckpt_format:
            raise ValueError(f"Invalid --resume: the checkpoint {ckpt_path} was written with --distributed "
                             f"{'none' if ckpt_format == 'full' else 'ddp or fsdp2'}; resume it that way")
        parallel.load_full_state(model, opt, ckpt["model"], ckpt["optimizer"], world)
        sched.load_state_dict(ckpt["scheduler"])
        batches.gen.set_state(ckpt["data_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        hist, start = ckpt["history"], ckpt["step"]

    def checkpoint(step: int) -> None:
        model_sd, opt_sd = parallel.full_state(model, opt, world)  # every rank takes part
        if world.main:
            save_atomic({"model": model_sd, "optimizer": opt_sd, "scheduler": sched.state_dict(),
                         "data_rng": batches.gen.get_state(), "torch_rng": torch.get_rng_state(), "history": hist,
                         "step": step, "config": {k: cfg[k] for k in SHAPING}, "format": ckpt_format}, ckpt_path)
        parallel.barrier(world)

    bar = None
    if progress and world.main:
        from tqdm import tqdm

        bar = tqdm(total=cfg["steps"], initial=start, desc=f"{name:6s}", unit="step", dynamic_ncols=True)
    tokens_per_step = cfg["batch_size"] * cfg["seq_len"]
    for step in range(start, cfg["steps"]):
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
        done = step + 1
        if done % cfg["eval_every"] == 0 or done == cfg["steps"]:
            hist["held_out"].append([done, evaluate(model, held_out, cfg["seq_len"], device)])
        if bar is not None:
            rate = tokens_per_step / statistics.fmean(hist["wall_s"][-20:])
            bar.set_postfix(loss=f"{hist['loss'][-1]:.3f}", lr=f"{lr:.1e}", tok_s=f"{rate:,.0f}")
            bar.update(1)
        if stop_after is not None and done - start >= stop_after and done < cfg["steps"]:
            checkpoint(done)
            if bar is not None:
                bar.close()
            return {"finished": False, "step": done}
        if done % cfg["checkpoint_every"] == 0 or done == cfg["steps"]:
            checkpoint(done)
    if bar is not None:
        bar.close()
    return {
        "finished": True,
        "groups": describe_groups(opt),
        "params": n_params,
        "final_train_loss": statistics.fmean(hist["loss"][-10:]),
        "held_out_loss": hist["held_out"][-1][1],
        "tokens_per_s": len(hist["wall_s"]) * tokens_per_step / sum(hist["wall_s"]),
        "optimizer_step_ms": statistics.median(hist["step_ms"]),
        "state_bytes": parallel.local_bytes(opt),  # this rank's
        "history": hist,
    }


def plot(results: dict[str, dict[str, Any]], entropy: float, out: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in results.items():
        losses = r["history"]["loss"]
        line, = ax.plot(range(1, len(losses) + 1), losses, alpha=0.35, lw=0.8)
        ema, smooth = losses[0], []
        for v in losses:
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax.plot(range(1, len(losses) + 1), smooth, color=line.get_color(), label=f"{name} train (EMA)")
        steps, held = zip(*r["history"]["held_out"])
        ax.plot(steps, held, "o--", color=line.get_color(), label=f"{name} held-out")
    ax.axhline(entropy, color="gray", ls=":", label=f"unigram entropy {entropy:.2f}")
    ax.set(xlabel="step", ylabel="cross-entropy (nats / byte)", title="small LLaMA on the Python docs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, r in results.items():
        ax.plot(range(len(r["history"]["lr"])), r["history"]["lr"], label=name)
    ax.set(xlabel="step", ylabel="learning rate", yscale="log", title="learning rate per step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "lr.png", dpi=120)
    plt.close(fig)
    return [out / "loss.png", out / "lr.png"]


def run(cfg: dict[str, Any], *, resume: bool = False, stop_after: int | None = None, progress: bool = True) -> int:
    world, device = parallel.start(cfg["distributed"], cfg["device"])
    try:
        return _run(cfg, resume=resume, stop_after=stop_after, progress=progress, world=world, device=device)
    finally:
        parallel.stop(world)


def _run(cfg: dict[str, Any], *, resume: bool, stop_after: int | None, progress: bool, world: parallel.World,
         device: torch.device) -> int:
    out = pathlib.Path(cfg["out"])
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
    say = print if world.main else (lambda *a, **k: None)
    text, source = load_text()
    train_data, held_out = split(text)
    entropy = unigram_entropy(bytes(held_out.tolist()))
    say(f"text: {source}, {len(text):,} bytes ({len(train_data):,} train / {len(held_out):,} held out); "
        f"unigram entropy of the held-out text {entropy:.3f} nats/byte")
    results = {}
    for name in cfg["optimizers"]:
        r = train_one(name, cfg, train_data, held_out, out, resume=resume, stop_after=stop_after, progress=progress,
                      world=world, device=device)
        if not r["finished"]:
            say(f"{name}: stopped after step {r['step']}; continue with --resume --out {out}")
            return 0
        say(f"  {r['groups']}")
        results[name] = r
    if not world.main:
        return 0
    params = next(iter(results.values()))["params"]
    print(f"\nsmall LLaMA, {params / 1e6:.2f} M parameters, {cfg['steps']} steps of "
          f"{cfg['batch_size']}x{cfg['seq_len']} bytes, {cfg['schedule']} schedule, warmup {cfg['warmup_steps']}"
          f"{parallel.describe(world)}")
    state = "state MB" if world.mode == "none" else "state MB/rank"
    header = f"{'optimizer':10s} {'train loss':>10s} {'held-out':>9s} {'tokens/s':>9s} {'opt step ms':>12s} {state:>9s}"
    print(header)
    for name, r in results.items():
        print(f"{name:10s} {r['final_train_loss']:10.3f} {r['held_out_loss']:9.3f} {r['tokens_per_s']:9,.0f} "
              f"{r['optimizer_step_ms']:12.2f} {r['state_bytes'] / 2**20:9.2f}")
    print(f"(held-out loss of a model that ignores context: {entropy:.3f})")
    files = plot(results, entropy, out)
    summary = {"config": cfg, "text": source, "unigram_entropy": entropy, "world_size": world.size,
               "results": {n: {k: v for k, v in r.items() if k != "finished"} for n, r in results.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {', '.join(str(f) for f in files)}, {out / 'summary.json'}")
    return 0
