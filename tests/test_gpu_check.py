"""benchmarks/gpu_check.sh, the one-shot GPU check, in its dry-run mode on the CPU.

The script archives its results folder into DEST/gpu_check.tgz after every step (written to a
temporary name, then renamed), so a run killed in the middle still hands back every finished
step. The dry run here is killed with SIGKILL (its whole session) once the archive shows
the third step finished; the archive must then be a valid tarball holding those steps' logs and
none of the later steps'. Also: the single-configuration autotune switch of the Triton kernels
and the row-by-row CSV writer of the benchmarks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHON"] = sys.executable
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _members(tgz: Path) -> dict[str, bytes]:
    """Every file of the archive with its content (reading them all proves it is whole)."""
    with tarfile.open(tgz, "r:gz") as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


def _session(sid: int) -> list[int]:
    """The processes of session ``sid`` (the script, its step's ``timeout`` and what that runs:
    ``timeout`` puts its command in a process group of its own, so killing one group is not
    enough)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    out.append(int(entry))
            except OSError:
                pass
    return out


def _kill_session(sid: int) -> None:
    for pid in _session(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def test_dry_run_killed_midway_keeps_the_finished_steps(tmp_path):
    dest, res = tmp_path / "out", tmp_path / "work" / "gpu_check"
    log = open(tmp_path / "stdout.txt", "w")
    proc = subprocess.Popen(["bash", str(SCRIPT), "--dry-run", str(dest)], cwd=ROOT,
                            env=_env(BINSLT_RESULTS=str(res)), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    tgz = dest / "gpu_check.tgz"
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the dry run ended before it could be killed: " + (
                tmp_path / "stdout.txt").read_text()[-3000:]
            if tgz.exists():
                seen = list(_members(tgz))
                if "gpu_check/check.log" in seen:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("no archive with the check step within 90 s: "
                        + (tmp_path / "stdout.txt").read_text()[-3000:])
    finally:
        _kill_session(proc.pid)
        proc.wait(timeout=30)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    for _ in range(50):  # SIGKILL is asynchronous: the step's processes go within moments
        if not _session(proc.pid):
            break
        time.sleep(0.1)
    assert not _session(proc.pid)

    files = _members(tgz)
    for name in ("gpu_check.log", "summary.txt", "machine.log", "build.log", "check.log"):
        assert f"gpu_check/{name}" in files, sorted(files)
    for later in ("bench.log", "network.log", "pytest_ddp.log", "pytest_ddp.xml"):
        assert f"gpu_check/{later}" not in files, sorted(files)
    steps = files["gpu_check/gpu_check.log"].decode()
    assert "dry run" in steps
    for name, limit in (("machine", 15), ("build", 140), ("check", 20)):
        assert f"== {name} (limit {limit}s)" in steps, steps
    assert "== machine: ok" in steps and "== build: ok" in steps, steps
    assert "== check: " in steps, steps
    assert "python" in files["gpu_check/machine.log"].decode()
    assert "binslt._C imports from" in files["gpu_check/build.log"].decode()

    summary = (dest / "summary.txt").read_text()
    assert summary.startswith("binslt gpu_check (dry run)"), summary
    assert "  machine  ok" in summary and "  build    ok" in summary, summary
    assert "finished" not in summary, summary
    # Only the archive and the summary (and at most a half-written temporary) are in DEST.
    assert {p.name for p in dest.iterdir()} <= {"gpu_check.tgz", "summary.txt",
                                                  ".gpu_check.tgz.tmp", ".summary.txt.tmp"}


def test_gpu_check_options():
    ok = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True,
                        timeout=30)
    assert ok.returncode == 0 and "--dry-run" in ok.stdout and "timeout_s=" in ok.stdout
    for bad_args, env in ((["--fast"], {}), (["a", "b"], {}),
                          ([], {"BINSLT_GPU_DRY_RUN": "yes"}),
                          ([], {"BINSLT_GPU_BUDGET_S": "6m"})):
        r = subprocess.run(["bash", str(SCRIPT), *bad_args], capture_output=True, text=True,
                           env=_env(**env), timeout=30)
        assert r.returncode == 2, (bad_args, env, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "gpu_check.sh:" in r.stderr


def test_autotune_first_keeps_one_gpu_config(monkeypatch):
    from binslt.kernels import _common

    gpu = [dict(BLOCK_M=128, num_warps=8, num_stages=3), dict(BLOCK_M=64, num_warps=4,
                                                               num_stages=4)]
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(_common, "AUTOTUNE", "all")
    every = _common.autotune_configs(gpu, dict(BLOCK_M=16))
    assert [c.kwargs["BLOCK_M"] for c in every] == [128, 64]
    monkeypatch.setattr(_common, "AUTOTUNE", "first")
    first = _common.autotune_configs(gpu, dict(BLOCK_M=16))
    assert [(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in first] == [(128, 8, 3)]
    monkeypatch.setattr(_common, "INTERPRET", True)  # the interpreter keeps its one config
    assert [c.kwargs["BLOCK_M"] for c in _common.autotune_configs(gpu, dict(BLOCK_M=16))] == [16]


def test_autotune_switch_rejects_bad_values():
    r = subprocess.run([sys.executable, "-c", "import binslt.kernels._common"], cwd=ROOT,
                       env=_env(BINSLT_TRITON_AUTOTUNE="best", TRITON_INTERPRET="1"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "BINSLT_TRITON_AUTOTUNE must be 'all' or 'first', got 'best'" in r.stderr


def test_csv_appender_keeps_rows_before_finish(tmp_path):
    path = tmp_path / "r.csv"
    out = common.CsvAppender(path, ["a", "b"], {"device": "cpu"})
    out.add([{"a": 1, "b": 0.5}])
    meta, rows = common.read_csv(path)  # as a run stopped here would leave it
    assert meta == {"device": "cpu", "complete": "no (rows appended as measured)"}
    assert rows == [{"a": "1", "b": "0.5"}]
    out.add([{"a": 2}])
    assert common.read_csv(path)[1][-1] == {"a": "2", "b": ""}
    out.finish([{"a": 1, "b": 0.25}, {"a": 2, "b": 1.0}], {"device": "cpu", "wall_s": "3"})
    meta, rows = common.read_csv(path)
    assert meta == {"device": "cpu", "wall_s": "3", "complete": "yes"}
    assert rows == [{"a": "1", "b": "0.25"}, {"a": "2", "b": "1"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]  # no temporary left


def test_write_csv_replaces_atomically(tmp_path):
    path = tmp_path / "x.csv"
    common.write_csv(path, [{"a": 1}], ["a"], {"k": "v"})
    with open(path) as held:  # a reader of the old file keeps a whole file
        common.write_csv(path, [{"a": 2}], ["a"], {"k": "w"})
        assert held.read().splitlines() == ["# k: v", "a", "1"]
    assert common.read_csv(path) == ({"k": "w"}, [{"a": "2"}])


def _without_spikingjelly(tmp_path: Path) -> str:
    """A PYTHONPATH entry whose sitecustomize makes ``import spikingjelly`` fail."""
    block = tmp_path / "no_sj"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['spikingjelly'] = None\n")
    return str(block)


SJ_TEST_FILES = ["tests/test_convert.py", "tests/test_if.py", "tests/test_models.py",
                 "tests/test_semantics.py", "tests/test_zoo.py"]


def test_test_files_collect_without_spikingjelly(tmp_path):
    """The GPU image may lack SpikingJelly: the test files that compare against it import it
    only inside their tests (which then skip), so collection still succeeds."""
    env = _env(TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([_without_spikingjelly(tmp_path), env["PYTHONPATH"]])
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                        "-p", "no:cacheprovider", *SJ_TEST_FILES], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "error" not in r.stdout.splitlines()[-1], r.stdout[-2000:]
    assert int(r.stdout.splitlines()[-1].split()[0]) > 100, r.stdout[-500:]


def test_conv_lif_runs_without_spikingjelly(tmp_path):
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([_without_spikingjelly(tmp_path), env["PYTHONPATH"]])
    cmd = [sys.executable, str(ROOT / "benchmarks" / "conv_lif.py"), "--sets", "anchor",
           "--modes", "eval_fwd,train_fwdbwd", "--backends", "torch", "--repeats", "1",
           "--warmup", "0", "--no-check", "--threads", "1", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "conv_lif.py --no-sj" in r.stderr, r.stderr[-2000:]
    r = subprocess.run([*cmd, "--no-sj"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--no-sj: SpikingJelly baseline not run" in r.stderr
    (path,) = tmp_path.glob("conv_lif_cpu-*.csv")
    assert not list(tmp_path.glob("*.png"))
    meta, rows = common.read_csv(path)
    assert meta["sj_lif_impl"] == "not run (--no-sj)"
    assert [(r["backend"], r["mode"]) for r in rows] == [("torch", "eval_fwd"),
                                                         ("torch", "train_fwdbwd")]
    for row in rows:
        assert float(row["ms"]) > 0 and float(row["peak_bytes"]) >= 0
        assert row["sj_ms"] == row["speedup"] == row["sj_saved_bytes"] == row["saved_ratio"] == ""
    assert float(rows[1]["saved_bytes"]) > 0
