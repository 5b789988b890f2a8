"""The bench command (``python -m optimizer bench``): its table and JSON, a model's own
parameters and dtypes, compiled steps next to eager ones. Each runs the command in a
subprocess on the CPU."""

from __future__ import annotations

import subprocess
import sys


def test_bench_command_writes_the_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "optimizer", "bench", "--device", "cpu", "--model", "gpt2-30m", "--reps", "2",
         "--only", "torch AdamW fused", "ours Lion default", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "of bw" in done.stdout and "ours Lion default" in done.stdout
    import json

    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["torch AdamW fused"]["vs_torch_fused"] == 1.0 and rows["ours Lion default"]["ms"] > 0
    # the fraction of bandwidth is of the best one measured in the run (on a CPU, in-place)
    best = max(result["bandwidth_gb_per_s"].values())
    for row in rows.values():
        assert abs(row["fraction_of_bandwidth"] - row["gb_per_s"] / best) < 1e-9


def test_many_small_runs_both_lists_and_writes_the_readme_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- bench:cpu-many-small -->\nold table\n<!-- /bench:cpu-many-small -->\ntail\n")
    done = subprocess.run(
        [sys.executable, "-m", "optimizer", "bench", "--device", "cpu", "--model", "many-small", "--reps", "1",
         "--only", "torch AdamW fused", "ours AdamW default", "--readme", "cpu-many-small", "--json", "r.json"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "small-400x64x64: 400 tensors" in done.stdout and "small-2000x256: 2000 tensors" in done.stdout
    text = readme.read_text()
    assert "old table" not in text and text.endswith("<!-- /bench:cpu-many-small -->\ntail\n")
    assert "`small-400x64x64` (400 tensors" in text and "`small-2000x256` (2000 tensors" in text
    assert text.count("| torch AdamW fused |") == 2 and "| ours AdamW default |" in text
    assert "Measured " in text and "--model many-small" in text
    # the same table again from the JSON alone; a README without the markers is refused in one line
    measured = text
    readme.write_text("# x\n\n<!-- bench:cpu-many-small -->\n<!-- /bench:cpu-many-small -->\ntail\n")
    again = subprocess.run([sys.executable, "-m", "optimizer", "bench", "--from-json", "r.json", "--readme",
                            "cpu-many-small"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert readme.read_text() == measured
    readme.write_text("# no markers\n")
    refused = subprocess.run([sys.executable, "-m", "optimizer", "bench", "--from-json", "r.json", "--readme",
                              "cpu-many-small"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert refused.returncode == 2 and "Invalid --readme" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_bench_takes_a_models_own_parameters_and_dtypes():
    done = subprocess.run(
        [sys.executable, "-m", "optimizer", "bench", "--device", "cpu", "--model", "optimizer.demo.llama:Llama",
         "--dtype", "bf16", "--state-dtype", "bf16", "--reps", "1", "--only", "torch AdamW fused", "ours Lion default"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    from optimizer.demo.llama import Llama

    n = sum(p.numel() for p in Llama().parameters())
    assert f"{n / 1e6:.1f} M params, bf16 params, state bf16" in done.stdout
    lion = next(line for line in done.stdout.splitlines() if line.startswith("ours Lion default"))
    assert lion.split()[4] == "10"  # bytes per parameter: 3 x 2 (p, g, p) + 2 x 2 (m, m)


def test_bench_compile_times_compiled_steps_next_to_eager_ones():
    done = subprocess.run(
        [sys.executable, "-m", "optimizer", "bench", "--device", "cpu", "--model", "optimizer.demo.llama:Llama",
         "--reps", "1", "--compile", "--only", "ours Lion reference"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    compiled = next(line for line in done.stdout.splitlines() if line.startswith("ours Lion reference compiled"))
    assert compiled.split()[-1].endswith("x")  # its ratio to the eager row of the same run
