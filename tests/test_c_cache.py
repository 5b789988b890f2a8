"""The cache of compiled C libraries (Note [kernel cache] in optimizer/_fused_cpu.py): a later
process loads the library without compiling; a change of source, flags, compiler or processor
is another key; entries appear whole, also when processes build one at once; a cache folder or
file that is not this user's alone is not used (the step compiles per process, as without a
cache, and still runs fused); ``CLEAROPTIM_CACHE_DIR=""`` turns it off. Every test points the
cache at its own temporary folder."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import warnings
from collections import OrderedDict

import pytest
import torch

from optimizer import _fused_cpu
from optimizer._fused_cpu import BLOCK

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root ignores modes: some checks cannot be staged


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """This process as if nothing had been compiled or loaded yet, with its cache in tmp_path/cache
    and the compiler ``cc``."""
    for name, value in (("_libraries", {}), ("_failed", []), ("_warned", []), ("_loaded", {}), ("_identities", {}),
                        ("_probe_failed", []), ("_PLANS", OrderedDict())):
        monkeypatch.setattr(_fused_cpu, name, value)
    monkeypatch.setenv("CLEAROPTIM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "cc")
    return tmp_path / "cache"


def lion_steps_fused_as_the_reference():
    """Two Lion steps with fused=True (which raises if the C loop cannot be had) equal the reference's."""
    from optimizer import Lion

    p = torch.nn.Parameter(torch.linspace(-1, 1, 2 * BLOCK + 3))
    q = torch.nn.Parameter(p.detach().clone())
    a, b = Lion([p], lr=0.1, weight_decay=0.1, fused=True), Lion([q], lr=0.1, weight_decay=0.1, fused=False,
                                                                     foreach=False)
    for k in range(2):
        p.grad = torch.cos(torch.arange(p.numel(), dtype=torch.float32) * (k + 1))
        q.grad = p.grad.clone()
        a.step()
        b.step()
    assert "lion" in _fused_cpu._libraries
    assert torch.equal(p, q)


def entries(cache):
    """The cache's entries (and anything else in its folder of libraries), by name."""
    folder = cache / _fused_cpu._CACHE_FOLDER
    return sorted(os.listdir(folder)) if folder.is_dir() else []


# ---- a later process loads from the cache ----

def wrapper(tmp_path):
    """A ``$CC`` that writes each of its command lines to a log, then runs ``cc``; its ``--version``
    ends with ``$WRAPPER_VERSION`` (a stand-in for an upgraded compiler)."""
    log, script = tmp_path / "cc.log", tmp_path / "cc-wrapper"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        printf '%s\\n' "$*" >> '{log}'
        if [ "$1" = --version ]; then cc --version; echo "wrapper ${{WRAPPER_VERSION:-1}}"; exit 0; fi
        exec cc "$@"
        """))
    script.chmod(0o755)
    return script, log


def compiles(log):
    """The compiler's command lines in ``log`` that built something (not its --version)."""
    return [line for line in log.read_text().splitlines() if " -o " in line] if log.exists() else []


STEP = textwrap.dedent("""
    import logging, warnings, torch
    logging.basicConfig(level=logging.DEBUG, format="log: %(message)s")
    from optimizer import Lion, _fused_cpu
    p = torch.nn.Parameter(torch.linspace(-1, 1, 40001)); q = torch.nn.Parameter(p.detach().clone())
    a, b = Lion([p], lr=0.1, fused=True), Lion([q], lr=0.1, foreach=False, fused=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(3):
            p.grad = torch.cos(torch.arange(40001.0) * (k + 1)); q.grad = p.grad.clone()
            a.step(); b.step()
    print("fused", "lion" in _fused_cpu._libraries, "equal", torch.equal(p, q), "warnings", len(caught),
          "sum", p.double().sum().item())
""")


def run_step(cache, cc, **env):
    done = subprocess.run([sys.executable, "-c", STEP], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CLEAROPTIM_CACHE_DIR": str(cache), "CC": str(cc), **env})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fused True equal True warnings 0" in done.stdout, done.stdout + done.stderr
    return done.stdout + done.stderr


def summary(out):
    """The line a step's process printed: fused or not, equal to the reference, warnings, its sum."""
    return next(line for line in out.splitlines() if line.startswith("fused "))


def test_a_later_process_loads_the_library_without_compiling(tmp_path):
    cc, log = wrapper(tmp_path)
    cache = tmp_path / "cache"
    first = run_step(cache, cc)
    built = compiles(log)
    assert built and "compiled the fused CPU kernel lion" in first and "cached in" in first, first
    assert len(entries(cache)) == 1
    second = run_step(cache, cc)
    assert compiles(log) == built, second  # no compile: only `cc --version`
    assert "loaded the fused CPU kernel lion" in second and "from the cache" in second, second
    assert summary(first) == summary(second)  # the same library, the same result
    # an upgraded compiler (another --version) builds anew, beside the old entry
    third = run_step(cache, cc, WRAPPER_VERSION="2")
    assert len(compiles(log)) > len(built) and "cached in" in third, third
    assert len(entries(cache)) == 2


def test_an_entry_holds_the_library_its_source_and_how_it_was_built(fresh):
    lion_steps_fused_as_the_reference()
    (name,) = entries(fresh)
    entry = fresh / _fused_cpu._CACHE_FOLDER / name
    assert name.startswith("lion-")
    assert sorted(os.listdir(entry)) == ["build.json", "lion.c", "lion.so"]
    assert (entry / "lion.c").read_text() == _fused_cpu.source(_lion_kernel())
    record = json.loads((entry / "build.json").read_text())
    assert record["flags"] in [list(flags) for flags in _fused_cpu._FLAG_SETS]
    for path in (fresh, fresh / _fused_cpu._CACHE_FOLDER, entry, *entry.iterdir()):
        assert path.stat().st_mode & 0o077 == 0, path  # this user's alone, whatever the umask


def _lion_kernel():
    from optimizer.lion import _LION_KERNEL

    return _LION_KERNEL


# ---- the key ----

def test_a_change_of_source_flags_compiler_or_processor_is_another_key(monkeypatch):
    text = _fused_cpu.source(_lion_kernel())

    def key(cc=("cc",), path="/usr/bin/gcc-12", version="gcc 12.2.0\n", processor="model name : A", text=text,
            cflags=_fused_cpu._CFLAGS, flag_sets=_fused_cpu._FLAG_SETS):
        with monkeypatch.context() as m:
            m.setattr(_fused_cpu, "_identities", {tuple(cc): (path, version)})  # (no compiler runs)
            m.setattr(_fused_cpu, "_processor", lambda: processor)
            m.setattr(_fused_cpu, "_CFLAGS", cflags)
            m.setattr(_fused_cpu, "_FLAG_SETS", flag_sets)
            return _fused_cpu._key(list(cc), text)

    base = key()
    assert key() == base  # the same inputs, the same key
    keys = {"source": key(text=text + "\n"), "command line": key(cc=("cc", "-w")), "program": key(cc=("clang",)),
            "resolved path": key(path="/opt/gcc/bin/gcc"), "version": key(version="gcc 12.3.0\n"),
            "flags": key(cflags=(*_fused_cpu._CFLAGS, "-ffast-math")),
            "flag sets": key(flag_sets=_fused_cpu._FLAG_SETS[1:]),
            "processor (-march=native)": key(processor="model name : B")}
    assert base not in keys.values() and len(set(keys.values())) == len(keys), keys


def test_a_compiler_whose_version_cannot_be_read_is_not_cached(fresh, tmp_path, caplog):
    script = tmp_path / "no-version-cc"
    script.write_text('#!/bin/sh\nif [ "$1" = --version ]; then exit 1; fi\nexec cc "$@"\n')
    script.chmod(0o755)
    os.environ["CC"] = str(script)  # (fresh's monkeypatch restores it)
    with caplog.at_level(logging.INFO, logger="optimizer"):
        lion_steps_fused_as_the_reference()
    assert "not cached:" in caplog.text and "--version failed" in caplog.text, caplog.text
    assert entries(fresh) == []


# ---- written whole ----

def test_processes_that_build_one_entry_at_once_all_get_a_working_library(tmp_path):
    """Three processes, started together on an empty cache, reach their first step together (a
    barrier of files): each compiles, one rename wins, all step fused and alike."""
    cache, ready = tmp_path / "cache", tmp_path / "ready"
    ready.mkdir()
    barrier = textwrap.dedent(f"""
        import os, sys, time
        open(os.path.join({str(ready)!r}, str(os.getpid())), "w").close()
        deadline = time.time() + 120
        while len(os.listdir({str(ready)!r})) < 3 and time.time() < deadline:
            time.sleep(0.01)
    """)
    env = {**os.environ, "CLEAROPTIM_CACHE_DIR": str(cache), "CC": "cc"}
    procs = [subprocess.Popen([sys.executable, "-c", barrier + STEP], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for _ in range(3)]
    outs = [proc.communicate(timeout=300)[0] for proc in procs]
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0 and "fused True equal True warnings 0" in out, out
    assert len(set(map(summary, outs))) == 1
    (name,) = entries(cache)  # one entry, no staging folder left
    assert name.startswith("lion-")
    lib, _ = _fused_cpu._load_entry(cache / _fused_cpu._CACHE_FOLDER / name, "lion")  # the winner's, whole
    assert hasattr(lib, "lion_float_float")


def test_publishing_an_entry_that_is_there_keeps_the_first(fresh, tmp_path):
    """The loser of two renames: its copy goes, the entry that won stays whole and is loaded."""
    cc = ["cc"]
    folder, why = _fused_cpu._cache_folder()
    assert folder is not None, why
    entry = folder / "probe-test"
    builds = []
    for k in range(2):
        built = tmp_path / f"built{k}"
        built.mkdir()
        builds.append(_fused_cpu._build(cc, "probe", _fused_cpu._PROBE_SOURCE + f"int version_{k};\n", str(built)))
        _fused_cpu._publish(folder, entry, built, "probe", builds[-1])
    assert os.listdir(folder) == ["probe-test"]
    assert "version_0" in (entry / "probe.c").read_text()
    lib, build = _fused_cpu._load_entry(entry, "probe")
    assert lib.clearoptim_probe() >= 1 and build == builds[0]


def test_staging_folders_of_killed_processes_are_removed_on_this_machine_only(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host, prefix = socket.gethostname(), _fused_cpu._DIR_PREFIX
    stale = tempfile.mkdtemp(prefix=f"{prefix}{dead.pid}-{host}-", dir=tmp_path)
    elsewhere = tempfile.mkdtemp(prefix=f"{prefix}{dead.pid}-other-{host}-", dir=tmp_path)  # another machine's
    alive = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-{host}-", dir=tmp_path)
    entry = tmp_path / "lion-0123"
    entry.mkdir()
    _fused_cpu._remove_stale_build_dirs(tmp_path, host)
    assert not os.path.exists(stale)
    assert os.path.exists(elsewhere) and os.path.exists(alive) and entry.exists()


# ---- a cache that is not this user's alone is not used ----

def _loosen_root(cache):
    cache.mkdir(mode=0o700)
    cache.chmod(0o777)
    return "is writable by its group or others (mode 777)"


def _loosen_folder(cache):
    cache.mkdir(mode=0o700)
    (cache / _fused_cpu._CACHE_FOLDER).mkdir(mode=0o700)
    (cache / _fused_cpu._CACHE_FOLDER).chmod(0o770)
    return "is writable by its group or others (mode 770)"


def _loosen_library(cache):
    lion_steps_fused_as_the_reference()  # a good entry, then its library made writable by its group
    (name,) = entries(cache)
    (cache / _fused_cpu._CACHE_FOLDER / name / "lion.so").chmod(0o620)
    _fused_cpu._libraries.clear()
    _fused_cpu._PLANS.clear()
    return "lion.so is writable by its group or others (mode 620)"


def _loosen_record(cache):
    lion_steps_fused_as_the_reference()
    (name,) = entries(cache)
    (cache / _fused_cpu._CACHE_FOLDER / name / "build.json").chmod(0o602)
    _fused_cpu._libraries.clear()
    _fused_cpu._PLANS.clear()
    return "build.json is writable by its group or others (mode 602)"


def _foreign_root(cache):
    if ROOT:  # root can give the folder away
        cache.mkdir(mode=0o700)
        os.chown(cache, 65534, 65534)
        return "belongs to uid 65534"
    os.environ["CLEAROPTIM_CACHE_DIR"] = "/"  # (fresh's monkeypatch restores it) root's, not ours
    return "belongs to uid 0"


def _foreign_library(cache):
    if not ROOT:
        pytest.skip("only root can give a file away")
    lion_steps_fused_as_the_reference()
    (name,) = entries(cache)
    os.chown(cache / _fused_cpu._CACHE_FOLDER / name / "lion.so", 65534, 65534)
    _fused_cpu._libraries.clear()
    _fused_cpu._PLANS.clear()
    return "lion.so belongs to uid 65534"


UNSAFE = {"cache folder writable by all": _loosen_root, "libraries folder writable by its group": _loosen_folder,
          "library writable by its group": _loosen_library, "build record writable by others": _loosen_record,
          "cache folder of another user": _foreign_root, "library of another user": _foreign_library}


@pytest.mark.parametrize("case", list(UNSAFE))
def test_a_cache_that_others_may_write_is_not_used(fresh, case, caplog):
    """The step compiles per process and runs fused; the compile's INFO line says why it was not
    cached; nothing warns; nothing is written into the cache."""
    reason = UNSAFE[case](fresh)
    before = entries(fresh)
    with caplog.at_level(logging.DEBUG, logger="optimizer"):
        lion_steps_fused_as_the_reference()
    lines = [r for r in caplog.records if "the fused CPU kernel lion" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO, caplog.text
    assert "not cached:" in lines[0].getMessage() and reason in lines[0].getMessage(), lines[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert entries(fresh) == before
    assert _fused_cpu._loaded["lion"].entry is None and not _fused_cpu._failed


def test_no_warning_where_the_cache_is_not_used(fresh):
    _loosen_root(fresh)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lion_steps_fused_as_the_reference()


@pytest.mark.skipif(ROOT, reason="root writes into read-only folders")
def test_a_read_only_cache_serves_what_it_holds_and_builds_the_rest_per_process(fresh, caplog):
    lion_steps_fused_as_the_reference()
    folder = fresh / _fused_cpu._CACHE_FOLDER
    folder.chmod(0o500)
    try:
        _fused_cpu._libraries.clear()
        _fused_cpu._PLANS.clear()
        with caplog.at_level(logging.DEBUG, logger="optimizer"):
            lion_steps_fused_as_the_reference()  # there already: loaded
            assert _fused_cpu._loaded["lion"].hit
            from optimizer import Lion8bit  # not there: built per process, the cache left as it is

            p = torch.nn.Parameter(torch.randn(16, 512))
            p.grad = torch.randn(16, 512)
            Lion8bit([p], fused=True).step()
        assert "not cached: the cache cannot be used" in caplog.text, caplog.text
        assert len(os.listdir(folder)) == 1
    finally:
        folder.chmod(0o700)


# ---- where it is, and off ----

def test_the_cache_folder_is_chosen_as_a_user_expects(monkeypatch, tmp_path):
    monkeypatch.delenv("CLEAROPTIM_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    expected = tmp_path / "home" / ".cache" / "clearoptim" / _fused_cpu._CACHE_FOLDER
    assert _fused_cpu._cache_folder() == (expected, "")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored, as the XDG spec says
    assert _fused_cpu._cache_folder() == (expected, "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _fused_cpu._cache_folder() == (tmp_path / "xdg" / "clearoptim" / _fused_cpu._CACHE_FOLDER, "")
    monkeypatch.setenv("CLEAROPTIM_CACHE_DIR", str(tmp_path / "mine"))
    assert _fused_cpu._cache_folder() == (tmp_path / "mine" / _fused_cpu._CACHE_FOLDER, "")
    for made in (tmp_path / "mine", tmp_path / "mine" / _fused_cpu._CACHE_FOLDER, expected.parent, expected):
        assert made.stat().st_mode & 0o777 == 0o700, made


def test_an_empty_cache_dir_turns_the_cache_off(fresh, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CLEAROPTIM_CACHE_DIR", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _fused_cpu._cache_folder() == (None, "CLEAROPTIM_CACHE_DIR is empty")
    with caplog.at_level(logging.INFO, logger="optimizer"):
        lion_steps_fused_as_the_reference()
    assert "not cached: CLEAROPTIM_CACHE_DIR is empty" in caplog.text, caplog.text
    assert not (tmp_path / "home").exists() and not (tmp_path / "xdg").exists()
    assert _fused_cpu.toolchain()["cache"] == "off: CLEAROPTIM_CACHE_DIR is empty"


# ---- toolchain() ----

def test_toolchain_reports_the_compiler_flags_openmp_and_cache(fresh):
    info = _fused_cpu.toolchain()
    assert list(info) == ["compiler", "version", "flags", "openmp", "cache"]
    assert all(isinstance(v, str) for v in info.values())
    assert info["compiler"] == "cc"
    first = subprocess.run(["cc", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    assert info["version"] == first
    assert info["flags"].startswith(" ".join(_fused_cpu._CFLAGS))
    assert (info["openmp"] == "yes") == ("-fopenmp" in info["flags"].split())
    assert info["openmp"] == "yes" or info["openmp"].startswith("no: ")
    assert info["cache"] == str(fresh / _fused_cpu._CACHE_FOLDER)
    assert [name.split("-")[0] for name in entries(fresh)] == ["probe"]  # the probe, cached
    assert _fused_cpu.toolchain() == info


def test_toolchain_says_why_there_is_no_openmp(fresh, tmp_path):
    """A compiler that rejects -fopenmp: the build is single-threaded, and says why; a later
    process reads the same from the cache, without compiling."""
    script, log = tmp_path / "no-openmp-cc", tmp_path / "cc.log"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        printf '%s\\n' "$*" >> '{log}'
        for a in "$@"; do
            if [ "$a" = -fopenmp ]; then echo "no-openmp-cc: error: -fopenmp is not supported" >&2; exit 1; fi
        done
        exec cc "$@"
        """))
    script.chmod(0o755)
    os.environ["CC"] = str(script)  # (fresh's monkeypatch restores it)
    info = _fused_cpu.toolchain()
    assert info["openmp"] == "no: no-openmp-cc: error: -fopenmp is not supported", info
    assert "-fopenmp" not in info["flags"] and info["version"] != "not found"
    built = compiles(log)
    code = "from optimizer import _fused_cpu; print(_fused_cpu.toolchain())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CC": str(script)})
    assert repr(info) in done.stdout, done.stdout + done.stderr
    assert compiles(log) == built


def test_toolchain_never_raises(fresh, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    info = _fused_cpu.toolchain()
    assert info["compiler"] == "/nonexistent/cc" and info["version"] == "not found"
    assert info["openmp"].startswith("no: no C compiler") and info["flags"]
    monkeypatch.setenv("CC", "true")  # runs, builds nothing
    monkeypatch.setattr(_fused_cpu, "_identities", {})
    info = _fused_cpu.toolchain()
    assert info["openmp"].startswith("no: the probe could not be built"), info
    monkeypatch.setattr(_fused_cpu, "_cache_folder", lambda: 1 / 0)
    assert _fused_cpu.toolchain()["openmp"].startswith("no: ")
