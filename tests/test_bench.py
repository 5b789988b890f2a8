"""The bench command (``python -m optimizer bench``): its table and JSON, a model's own
parameters and dtypes, compiled steps next to eager ones, and the repository's
tools/bench_tables.py that writes the tables from the JSON. Each runs the command in a
subprocess on the CPU."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


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


def test_many_small_runs_both_lists_and_the_tool_writes_the_tables(tmp_path):
    """--model many-small times both lists into one JSON; tools/bench_tables.py (a repository script, not
    the package) copies it to docs/bench/NAME.json and writes the table between its markers; --check
    fails where a table is not its JSON's."""
    from optimizer import bench

    (tmp_path / "README.md").write_text("# x\n\n<!-- bench:cpu-many-small -->\nold table\n"
                                        "<!-- /bench:cpu-many-small -->\ntail\n")
    done = subprocess.run(
        [sys.executable, "-m", "optimizer", "bench", "--device", "cpu", "--model", "many-small", "--reps", "1",
         "--only", "torch AdamW fused", "ours AdamW default", "--json", "r.json"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "small-400x64x64: 400 tensors" in done.stdout and "small-2000x256: 2000 tensors" in done.stdout
    assert "old table" in (tmp_path / "README.md").read_text()  # the package writes no file but the JSON
    tool = [sys.executable, str(ROOT / "tools" / "bench_tables.py"), "--root", str(tmp_path)]
    wrote = subprocess.run([*tool, "cpu-many-small=r.json"], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert wrote.returncode == 0, wrote.stderr
    text = (tmp_path / "README.md").read_text()
    assert "old table" not in text and text.endswith("<!-- /bench:cpu-many-small -->\ntail\n")
    assert "`small-400x64x64` (400 tensors" in text and "`small-2000x256` (2000 tensors" in text
    assert text.count("| torch AdamW fused |") == 2 and "| ours AdamW default |" in text
    assert "Measured " in text and "--model many-small" in text
    kept = tmp_path / "docs" / "bench" / "cpu-many-small.json"
    assert kept.read_text() == (tmp_path / "r.json").read_text()
    assert bench.markdown(bench.load_results(str(kept))) in text
    # regenerated from the kept JSON alone: the same text; a table edited by hand fails --check
    assert subprocess.run([*tool, "--check"], capture_output=True, timeout=300).returncode == 0
    (tmp_path / "README.md").write_text(text.replace("| torch AdamW fused |", "| torch AdamW fused! |", 1))
    assert subprocess.run([*tool, "--check"], capture_output=True, timeout=300).returncode == 1
    assert subprocess.run(tool, capture_output=True, timeout=300).returncode == 0
    assert (tmp_path / "README.md").read_text() == text
    # a JSON for a table that no document marks is refused, in one line
    refused = subprocess.run([*tool, "other=r.json"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert refused.returncode == 2 and "no <!-- bench:other --> table" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_deprecated_readme_flags_write_no_document_and_say_what_to_run(tmp_path):
    """--readme NAME: one deprecation line, the JSON written (./NAME.json without --json, never over an
    existing file) and the tool's command printed; --from-json FILE: the table printed, nothing written."""
    readme = "# x\n\n<!-- bench:t -->\n<!-- /bench:t -->\n"
    (tmp_path / "README.md").write_text(readme)
    done = subprocess.run(
        [sys.executable, "-m", "optimizer", "bench", "--device", "cpu", "--model", "small-2000x256", "--reps", "1",
         "--only", "torch AdamW fused", "--readme", "t"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if line.startswith("python -m optimizer bench: warning")]
    assert len(warned) == 1 and "--readme is deprecated" in warned[0] and "tools/bench_tables.py" in warned[0]
    assert "python tools/bench_tables.py t=t.json" in done.stdout
    assert (tmp_path / "t.json").is_file() and (tmp_path / "README.md").read_text() == readme
    again = subprocess.run([sys.executable, "-m", "optimizer", "bench", "--device", "cpu", "--readme", "t"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 2 and "Invalid --readme: t.json exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    shown = subprocess.run([sys.executable, "-m", "optimizer", "bench", "--from-json", "t.json", "--readme", "t"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "| torch AdamW fused |" in shown.stdout and (tmp_path / "README.md").read_text() == readme
    assert "--from-json is deprecated" in shown.stderr and "python tools/bench_tables.py t=t.json" in shown.stderr
    (tmp_path / "bad.json").write_text("{}")
    bad = subprocess.run([sys.executable, "-m", "optimizer", "bench", "--from-json", "bad.json"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "Invalid --from-json" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


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


def test_bench_compile_times_compiled_steps_next_to_eager_ones(tmp_path):
    from optimizer import bench

    out = tmp_path / "compile.json"
    done = subprocess.run(
        [sys.executable, "-m", "optimizer", "bench", "--device", "cpu", "--model", "optimizer.demo.llama:Llama",
         "--reps", "1", "--compile", "--only", "ours Lion reference", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    compiled = next(line for line in done.stdout.splitlines() if line.startswith("ours Lion reference compiled"))
    assert compiled.split()[-1].endswith("x")  # its ratio to the eager row of the same run
    table = bench.markdown(bench.load_results(str(out)))  # the table keeps that ratio as a column
    assert "| / eager |" in table and next(line for line in table.splitlines()
                                           if line.startswith("| ours Lion reference compiled |")).endswith("x |")


def test_8bit_and_stochastic_rounding_rows_count_their_real_state(tmp_path):
    """The 8-bit rows (fp32 parameters) and the bf16-parameter rows with stochastic rounding, with the
    bytes they move and hold counted from their state after the steps: codes, scales, counters."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "optimizer", "bench", "--device", "cpu", "--model", "small-400x64x64", "--reps", "1",
         "--only", "torch AdamW fused", "8-bit", "8bit", "params SR", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "state B/param" in done.stdout
    import json

    from optimizer.bench import PEERS_8BIT

    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) >= {"torch AdamW fused", "ours AdamW 8-bit", "ours Lion 8-bit", "ours AdamW bf16 params SR",
                         "ours Lion bf16 params SR"}
    # per 64x64 tensor: 4096 one-byte codes and 64 float32 scales (a row of 64 is one block) per state
    code_and_scale = (4096 + 64 * 4) / 4096
    expected = {  # name: (bytes moved per parameter, state bytes per parameter)
        "torch AdamW fused": (28, 8 + 4 / 4096),  # + its step counter
        "ours AdamW 8-bit": (12 + 4 * code_and_scale, 2 * code_and_scale + 4 / 4096),
        "ours Lion 8-bit": (12 + 2 * code_and_scale, code_and_scale),
        "ours AdamW bf16 params SR": (3 * 2 + 4 * 4, 8 + 4 / 4096),  # fp32 states for bf16 parameters
        "ours Lion bf16 params SR": (3 * 2 + 2 * 4, 4),
    }
    for name, (moved, held) in expected.items():
        assert abs(rows[name]["bytes_per_param"] - moved) < 1e-9, name
        assert abs(rows[name]["state_bytes_per_param"] - held) < 1e-9, name
        assert rows[name]["vs_torch_fused"] is not None
    line = next(s for s in done.stdout.splitlines() if s.startswith("ours AdamW 8-bit"))
    assert line.split()[4:6] == ["16.2", "2.13"]  # B/param, state B/param
    # every 8-bit peer is timed or listed as skipped (not installed, or failing on this device)
    for name, *_ in PEERS_8BIT:
        assert name in rows or name in result["skipped"], name
    if result["skipped"]:
        assert "skipped: " in done.stdout


def test_peers_are_skipped_and_listed_where_they_cannot_run(monkeypatch, capsys):
    """A peer that is not installed, or whose first step fails on this device, is listed with why;
    one that runs is a row like ours."""
    import types

    import torch

    from optimizer import bench

    class Unsupported(torch.optim.Optimizer):
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        def step(self):
            raise NotImplementedError("no CPU kernel")

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=lambda ps, lr: torch.optim.AdamW(ps, lr=lr), Lion8bit=Unsupported)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed
    result = bench.run_one("small-400x64x64", "cpu", 1, ["torch AdamW fused", "bitsandbytes", "torchao"])
    out = capsys.readouterr().out
    assert [r["name"] for r in result["rows"]] == ["torch AdamW fused", "bitsandbytes AdamW8bit"]
    assert result["skipped"] == {
        "bitsandbytes Lion8bit": "bitsandbytes on cpu: NotImplementedError: no CPU kernel",
        "torchao AdamW8bit": "torchao is not installed"}
    assert ("skipped: bitsandbytes Lion8bit (bitsandbytes on cpu: NotImplementedError: no CPU kernel); "
            "torchao AdamW8bit (torchao is not installed)") in out
    table = bench.markdown([result])
    assert "| state B/param |" in table and "Skipped: bitsandbytes Lion8bit" in table


def test_table_of_results_written_before_the_state_column():
    """A JSON written before "state B/param" existed: that column reads "-"."""
    from optimizer import bench

    old = {"model": "gpt2-30m", "tensors": 76, "params": 27_800_000, "dtype": "fp32", "device": "cpu",
           "machine": "AMD EPYC, 2 threads", "date": "2026-11-23", "torch": "2.13.0", "reps": 30, "interleaved": True,
           "rows": [{"name": "torch AdamW fused", "ms": 23.45, "bytes_per_param": 28, "fraction_of_bandwidth": 0.98,
                     "vs_torch_fused": 1.0}]}
    assert "| torch AdamW fused | 23.45 | 28 | - | 98% | 1.00x |" in bench.markdown([old])


def test_sparse_table_times_sparse_adamw_against_dense_adamw_and_sparse_adam(tmp_path):
    """The sparse workload (an embedding, 1 % of its rows touched a step): ours, dense fused AdamW and
    SparseAdam in one run, each with its ratio to both; the bytes a step must move; its README table."""
    import json

    from optimizer import bench

    out = tmp_path / "sparse.json"
    done = subprocess.run(
        [sys.executable, "-m", "optimizer", "bench", "--device", "cpu", "--model", "embedding-16k-sparse",
         "--reps", "2", "--json", str(out)], capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "/dense AdamW fused" in done.stdout and "/SparseAdam" in done.stdout
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {r.name for r in bench.sparse_candidates()}
    assert rows["torch AdamW fused (dense)"]["vs_torch_fused"] == 1.0
    assert rows["torch SparseAdam"]["vs_sparse_adam"] == 1.0
    table_rows, dim, fraction = bench.SPARSE_MODELS["embedding-16k-sparse"]
    assert result["touched_rows"] == round(table_rows * fraction)
    for name, row in rows.items():  # read p, g, m, v and write p, m, v: of every element, or of the touched rows
        elements = table_rows * dim if name.endswith("(dense)") else result["touched_rows"] * dim
        assert row["bytes_moved"] == 28 * elements
        assert abs(row["vs_torch_fused"] * rows["torch AdamW fused (dense)"]["ms"] - row["ms"]) < 1e-9
        assert abs(row["vs_sparse_adam"] * rows["torch SparseAdam"]["ms"] - row["ms"]) < 1e-9
    table = bench.markdown([result])
    assert "| ours SparseAdamW default |" in table and "/ SparseAdam |" in table and "embedding-16k-sparse" in table
    refused = subprocess.run(
        [sys.executable, "-m", "optimizer", "bench", "--device", "cpu", "--model", "embedding-16k-sparse", "--dtype",
         "bf16"], capture_output=True, text=True, timeout=300,
    )
    assert refused.returncode == 2 and "Invalid options for --model embedding-16k-sparse" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


# ----- Muon: ours against torch.optim.Muon + torch's fused AdamW (Note [the Muon rows] in bench.py) -----


def test_newton_schulz_flops_are_what_torchs_flop_counter_counts_in_each_iteration():
    """bench.ns_flops against torch's own flop counter run over each implementation's iteration (ours one
    matrix at a time and batched, torch.optim.Muon's), for a tall, a wide and a square matrix; and the
    total of gpt2-30m's 24 hidden matrices (the issue measured "about 225 GFLOP")."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from optimizer import bench, muon

    args = (muon.NS_COEFFICIENTS, 5, 1e-7)
    iterations = {
        "ours": lambda g: muon._newton_schulz(g, *args, torch.float32),
        "ours batched": lambda g: muon._batched_newton_schulz(g[None].repeat(3, 1, 1), *args, torch.float32),
        "torch": lambda g: torch.optim._muon._zeropower_via_newtonschulz(g, *args),
    }
    for shape in [(80, 48), (48, 80), (64, 64)]:
        for name, iteration in iterations.items():
            with FlopCounterMode(display=False) as counter:
                iteration(torch.randn(shape))
            matrices = 3 if name == "ours batched" else 1
            assert counter.get_total_flops() == matrices * bench.ns_flops(shape), (name, shape)
    shapes, mask = bench.model_split("gpt2-30m")
    assert 220e9 < sum(bench.ns_flops(s) for s, m in zip(shapes, mask) if m) < 230e9


def test_muon_split_gives_muon_the_hidden_matrices_as_create_optimizer_does():
    import torch

    from optimizer import bench
    from optimizer.demo.llama import Llama
    from optimizer.factory import create_optimizer

    shapes, mask = bench.model_split("gpt2-30m")
    assert sum(mask) == 24 and mask[:2] == [False, False]  # the token and position embeddings go to AdamW
    assert {shapes[i] for i, m in enumerate(mask) if m} == {(1536, 512), (512, 512), (2048, 512), (512, 2048)}
    shapes, mask = bench.model_split("llama-1.1b")
    assert sum(mask) == 22 * 7 and not mask[0] and not mask[-1]  # the embedding and the output layer: AdamW
    assert all(bench.model_split("small-400x64x64")[1]) and not any(bench.model_split("small-2000x256")[1])
    # a model's own parameters: the tensors create_optimizer(model, "muon") puts in Muon's groups
    shapes, mask = bench.model_split("optimizer.demo.llama:Llama")
    torch.manual_seed(0)
    opt = create_optimizer(Llama(), "muon")
    muon = [tuple(p.shape) for g in opt.param_groups if g["use_muon"] for p in g["params"]]
    assert sorted(s for s, m in zip(shapes, mask) if m) == sorted(muon) and len(muon) > 0
    assert len(shapes) == sum(len(g["params"]) for g in opt.param_groups)


def test_muon_rows_time_ours_against_torch_muon_with_the_iterations_throughput(tmp_path):
    """The Muon rows: ours (default, 8-bit) and torch.optim.Muon + fused AdamW on the same split, each
    with its ratio to the torch pair; the iteration timed alone (ours, torch's), its GFLOP/s from the
    flops of the model's matrices, and its fraction of the matmul throughput measured in the run."""
    import json

    from optimizer import bench

    out = tmp_path / "muon.json"
    done = subprocess.run(
        [sys.executable, "-m", "optimizer", "bench", "--device", "cpu", "--model", "optimizer.demo.llama:Llama",
         "--reps", "1", "--only", "torch Muon", "ours Muon default", "ours Muon 8-bit", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "NS GFLOP/s" in done.stdout and "/torch Muon" in done.stdout and "measured matmul: " in done.stdout
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["torch Muon + AdamW fused", "ours Muon default", "ours Muon 8-bit"]
    theirs = rows["torch Muon + AdamW fused"]
    shapes, mask = bench.model_split("optimizer.demo.llama:Llama")
    flops = sum(bench.ns_flops(s) for s, m in zip(shapes, mask) if m)
    assert result["muon"]["matrices"] == sum(mask) and result["muon"]["ns_gflop_per_step"] == flops / 1e9
    matmul = result["muon"]["matmul_gflop_per_s"]
    for name, row in rows.items():
        assert abs(row["vs_torch_muon"] * theirs["ms"] - row["ms"]) < 1e-9, name
        if name == "ours Muon 8-bit":  # the same iteration as the default's: not timed twice
            assert row["ns_ms"] is None and row["ns_gflop_per_s"] is None
            continue
        assert row["ns_dtype"] in matmul and row["ns_ms"] > 0, name
        assert abs(row["ns_gflop_per_s"] - flops / 1e9 / row["ns_ms"] * 1e3) < 1e-6, name
        assert abs(row["fraction_of_matmul"] - row["ns_gflop_per_s"] / matmul[row["ns_dtype"]]) < 1e-12, name
    assert theirs["ns_dtype"] == "bf16"  # torch.optim.Muon's iteration always runs in bf16
    # the same split on both sides: the same state (a momentum per matrix, AdamW's moments for the rest)
    assert abs(rows["ours Muon default"]["state_bytes_per_param"] - theirs["state_bytes_per_param"]) < 1e-3
    table = bench.markdown(bench.load_results(str(out)))
    assert "| / torch Muon + AdamW | NS ms | NS GFLOP/s | of matmul |" in table
    assert f"Newton-Schulz (5 steps) on the {sum(mask)} hidden matrices: " in table
    assert table.splitlines()[-1].startswith("Measured ")  # the footer stays last (the headline reads it)


def test_a_list_without_hidden_matrices_has_no_muon_rows(capsys):
    from optimizer import bench

    result = bench.run_one("small-2000x256", "cpu", 1, ["Muon"])
    assert result["rows"] == [] and "muon" not in result
    assert "NS GFLOP/s" not in capsys.readouterr().out
