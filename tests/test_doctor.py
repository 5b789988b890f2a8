"""``python -m optimizer doctor`` (optimizer/doctor.py): it runs here and passes, it covers every
algorithm, state format and dtype with the default's pick named, and a backend that the
default picks and that computes a slightly wrong update turns the exit status to 1 and is
named. In-process through ``cli.main``, a few seconds in all."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from optimizer import Lion, _fused_cpu, cli

ALGORITHMS = ["AdamW", "Lion"]
FORMATS = ["default", "bf16", "8-bit"]
DTYPES = ["fp32", "bf16", "fp16", "fp64"]


@pytest.fixture(scope="module")
def report():
    """The JSON of one run on the CPU, and its exit status (shared: the run is the slow part)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(["doctor", "--device", "cpu", "--json"])
    return status, json.loads(out.getvalue())


def test_it_passes_here_and_covers_every_algorithm_format_and_dtype(report):
    status, data = report
    assert status == 0 and data["ok"], [c for c in data["defaults"] if c["verdict"] not in ("bit-equal", "agrees")]
    probes = {(c["algorithm"], c["states"], c["dtype"]) for c in data["checks"] if c["device"] == "cpu"}
    assert probes >= {(a, s, d) for a in ALGORITHMS for s in FORMATS for d in DTYPES}
    assert {("SparseAdamW", "default", d) for d in DTYPES} <= probes
    for algorithm in ALGORITHMS:
        backends = {c["backend"] for c in data["checks"] if c["algorithm"] == algorithm}
        assert {"foreach", "c"} <= backends
    # every available backend was run against the reference, and agrees with it here
    for c in data["checks"]:
        assert c["available"] or c["why"], c
        assert not c["available"] or c["verdict"] in ("bit-equal", "agrees"), c


def test_the_default_pick_is_the_dispatchers_and_is_named(report):
    _, data = report
    defaults = {(c["algorithm"], c["states"], c["dtype"]): c for c in data["defaults"]}
    # one default run per probe; 8-bit states do not apply to fp64 parameters
    expected = {(a, s, d) for a in ALGORITHMS for s in FORMATS for d in DTYPES if (s, d) != ("8-bit", "fp64")}
    assert set(defaults) - {("SparseAdamW", "default", d) for d in DTYPES} == expected
    for key, run in defaults.items():
        assert run["backend"] in ("reference", "foreach", "c", "torch"), run
        picked = [c for c in data["checks"] if (c["algorithm"], c["states"], c["dtype"]) == key and c["default"]]
        assert [c["backend"] for c in picked] in ([run["backend"]], []) and run["verdict"] in ("bit-equal", "agrees")
    # what the dispatcher documents (Note [backends]), where a C compiler works: AdamW's fp32 default is
    # torch's fused kernel, bf16 parameters take the C loop
    if any(c["backend"] == "c" and c["available"] for c in data["checks"]):
        assert defaults[("AdamW", "default", "fp32")]["backend"] == "torch"
        assert defaults[("AdamW", "default", "bf16")]["backend"] == "c"
        assert defaults[("Lion", "8-bit", "fp16")]["backend"] == "c"


def test_the_table_fits_a_screen_and_marks_the_defaults(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) <= 40 + 16 * torch.cuda.is_available() and max(map(len, lines)) <= 100, out
    if not torch.cuda.is_available():  # the CUDA rows say so, in one line
        assert [line for line in lines if line.startswith("cuda")] == [
            "cuda        not checked: no CUDA device" + (" (torch %s is a CPU build)" % torch.__version__
                                                         if torch.version.cuda is None else "")]
    assert torch.__version__ in out and "C compiler" in out and "OpenMP" in out
    for algorithm in [*ALGORITHMS, "SparseAdamW"]:
        assert any(line.startswith(algorithm + " ") for line in lines), algorithm
    assert sum(line.count("*") for line in lines) >= len(ALGORITHMS) * len(FORMATS) * len(DTYPES) - 2
    assert "OK:" in lines[-1]


def test_a_default_backend_that_is_slightly_wrong_fails_and_is_named(monkeypatch, capsys):
    """Lion's C loop with an error of 1e-5 of each value: far below what a user would notice in a
    loss, far above a rounding."""
    c = Lion.backends.c

    def off(params, *rest, **hyper):
        c(params, *rest, **hyper)
        with torch.no_grad():
            for p in params:
                p.mul_(1 + 1e-5)

    if _fused_cpu.library(Lion.backends.c_kernel, strict=False, warn=False) is None:
        pytest.skip("no C compiler: the C loop is no default here")
    monkeypatch.setattr(Lion, "backends", dataclasses.replace(Lion.backends, c=off))
    status = cli.main(["doctor", "--device", "cpu"])
    out = capsys.readouterr().out
    assert status == 1, out
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert fails and all("Lion" in line and "C loop" in line for line in fails), out
    assert any("fp32" in line for line in fails)
    assert "exit status 1" in out.splitlines()[-1]


def test_a_bad_flag_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["doctor", "--device", "tpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device" in err[0]
    if not torch.cuda.is_available():
        assert cli.main(["doctor", "--device", "cuda"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1
        assert "Invalid --device: 'cuda'" in captured.err
