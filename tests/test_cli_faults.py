"""Faults of the input and of the environment, the way a user meets them: the installed
`exits` command in a subprocess (a fresh PREFECT_HOME where Prefect is involved). A fault a
user can fix is ONE line, `error: <file>: <reason> (<ERRNO>)`, exit status 2, no traceback
(`exits --debug ...` shows it); a bug is one line and exit status 1. A SIGKILLed `exits run`
leaves no Prefect server behind."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from exits.cli import app
from exits.cli.support import DEBUG_ENV, describe_error, format_os_error
from exits.io import write_json
from exits.stages.pseudo_labels import encode_rle, write_pseudo_labels
from tests.conftest import make_coco
from tests.test_cli_first_run import exits_command, fresh_user_env, run_args, tiny_demo  # noqa: F401 (fixture)

ROOT = os.geteuid() == 0  # mode bits do not stop root: use a regular file where a folder should be


def exits(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`exits ARGS` as a user runs it (PREFECT_HOME=home, no server configured)."""
    return subprocess.run([*exits_command(), *args], capture_output=True, text=True, timeout=timeout,
                          env=fresh_user_env(home))


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a failed command; no traceback anywhere in its output."""
    both = done.stdout + done.stderr
    assert "Traceback" not in both and '\n  File "' not in both, both[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def unwritable_folder(parent: Path) -> tuple[Path, str]:
    """A run folder that cannot be written and the one line expected for it."""
    if ROOT:
        (parent / "file.txt").write_text("a file, not a folder")
        path = parent / "file.txt" / "run"
        return path, f"error: {path}: Not a directory (ENOTDIR)"
    path = parent / "read-only"
    path.mkdir()
    path.chmod(0o555)
    return path, f"error: {path}: Permission denied (EACCES)"


# --- no Prefect involved: fails before a temporary server would start ----------------------

def test_unwritable_run_folder_is_one_line(tiny_demo, tmp_path):
    work, expected = unwritable_folder(tmp_path)
    args = run_args(tiny_demo, work)[len(exits_command()):]
    home = tmp_path / "prefect-home"
    done = exits(home, *args)
    assert done.returncode == 2 and one_error_line(done) == expected
    assert "Starting temporary server" not in done.stderr  # checked before Prefect starts (seconds)
    debug = exits(home, "--debug", *args)
    assert debug.returncode == 1 and "Traceback" in debug.stderr, debug.stderr[-3000:]
    assert ("NotADirectoryError" if ROOT else "PermissionError") in debug.stderr


def test_input_json_that_is_a_folder_is_one_line(tiny_demo, tmp_path):
    folder = tmp_path / "instances.json"
    folder.mkdir()
    images = str(tiny_demo / "images")
    home = tmp_path / "prefect-home"
    done = exits(home, "run", "-i", images, "-a", str(folder), "-w", str(tmp_path / "w"))
    assert done.returncode == 2 and one_error_line(done) == f"error: {folder}: Is a directory (EISDIR)"
    assert not (tmp_path / "w").exists()
    done = exits(home, "report", "-w", str(tmp_path / "w"), "--gt", str(folder))
    assert done.returncode == 2 and one_error_line(done) == f"error: {folder}: Is a directory (EISDIR)"
    done = exits(home, "validate", "-a", str(folder), "-i", images)
    assert done.returncode == 2 and str(folder) in one_error_line(done)


@pytest.fixture
def report_run(tmp_path) -> Path:
    """A run folder with pseudo masks (= the GT masks) of the tiny hand-made COCO set."""
    ann_json = make_coco(tmp_path / "data")
    coco = json.loads(ann_json.read_text())
    rows = [{"ann_id": a["id"], "rle": encode_rle(mask_utils.decode(a["segmentation"]).astype(bool)),
             "area": int(a["area"])} for a in coco["annotations"]]
    scores = {a["id"]: {"score": 1.0, "certainty": 1.0, "agreement": 1.0} for a in coco["annotations"]}
    work = tmp_path / "run"
    write_pseudo_labels(ann_json, rows, scores, work)
    write_json(work / "run.json", {"images": str(tmp_path / "data" / "images"), "annotations": str(ann_json), "gt": None})
    return work


def test_report_and_export_into_unwritable_places_are_one_line(report_run, tmp_path):
    work, home = report_run, tmp_path / "prefect-home"
    if ROOT:
        (work / "report").write_text("a file where the report folder goes")
        expected = f"error: {work / 'report'}: Not a directory (ENOTDIR)"
    else:
        (work / "report").mkdir()
        (work / "report").chmod(0o555)
        expected = f"error: {work / 'report' / 'metrics.parquet'}: Permission denied (EACCES)"
    done = exits(home, "report", "-w", str(work))
    assert done.returncode == 2 and one_error_line(done) == expected

    (work / "pseudo_labels_fixed.json").mkdir()  # a folder where export writes its file
    done = exits(home, "export", "-w", str(work))
    assert done.returncode == 2
    # (exits/spotfix formats this one itself, without the errno name so far)
    assert one_error_line(done).startswith(f"error: {work / 'pseudo_labels_fixed.json'}: Is a directory")
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]


# --- in-process: the formatting, a full disk, bugs, --debug ---------------------------------

def test_os_errors_read_as_file_reason_and_errno_name(tmp_path):
    assert format_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/a/x.json")) == \
        "/runs/a/x.json: No space left on device (ENOSPC)"
    assert format_os_error(PermissionError(errno.EACCES, "Permission denied")) == "Permission denied (EACCES)"
    assert format_os_error(OSError(errno.EXDEV, os.strerror(errno.EXDEV), "/a", None, "/b")) == \
        "/a -> /b: Invalid cross-device link (EXDEV)"
    assert describe_error(FileNotFoundError(errno.ENOENT, "No such file or directory", b"caf\xe9.png")) == \
        (2, "caf\udce9.png: No such file or directory (ENOENT)")
    code, msg = describe_error(KeyError("boom"))
    assert (code, msg) == (1, "internal error: KeyError: 'boom' (run with --debug for the traceback)")
    # a ValueError of our own checks is the user's to fix (2); one from inside a library is a bug (1)
    from exits.run_folder import RunFolder

    (tmp_path / "run.json").write_text("{")
    with pytest.raises(ValueError) as ours:
        RunFolder(tmp_path).read_meta()
    assert describe_error(ours.value) == (2, str(ours.value)) and str(tmp_path / "run.json") in str(ours.value)
    with pytest.raises(ValueError) as theirs:
        json.loads("{")
    assert describe_error(theirs.value)[0] == 1


def test_a_full_disk_names_the_file_and_leaves_no_temporary(report_run, monkeypatch):
    """ENOSPC arrives from write/fsync without a file name: the atomic writer names its
    destination, removes its temporary file, and the command says it in one line."""
    import exits.io.files

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(exits.io.files.os, "fsync", full)
    dest = report_run / "out" / "x.json"
    with pytest.raises(OSError) as caught:
        write_json(dest, {"a": 1})
    assert caught.value.filename == str(dest) and caught.value.errno == errno.ENOSPC
    assert describe_error(caught.value) == (2, f"{dest}: No space left on device (ENOSPC)")
    assert list(dest.parent.iterdir()) == []  # no temporary left behind, no partial file

    result = CliRunner().invoke(app, ["report", "-w", str(report_run)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    # The streamed report writes summary.json first and renames metrics.parquet over the old
    # one last, so the first file the full disk refuses is the summary.
    assert lines == [f"error: {report_run / 'report' / 'summary.json'}: No space left on device (ENOSPC)"]
    assert not list((report_run / "report").glob(".*.tmp"))


def test_a_bug_is_one_line_with_status_1_and_debug_shows_it(report_run, monkeypatch):
    import exits.stages.report

    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(exits.stages.report, "write_report", bug)
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    result = CliRunner().invoke(app, ["report", "-w", str(report_run)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == \
        ["error: internal error: ZeroDivisionError: division by zero (run with --debug for the traceback)"]
    debug = CliRunner().invoke(app, ["--debug", "report", "-w", str(report_run)])
    assert isinstance(debug.exception, ZeroDivisionError)  # propagates: the console script prints it
    monkeypatch.setenv(DEBUG_ENV, "1")
    from_env = CliRunner().invoke(app, ["report", "-w", str(report_run)])
    assert isinstance(from_env.exception, ZeroDivisionError)


def test_console_log_records_lose_their_traceback_other_handlers_keep_it(monkeypatch):
    """What Prefect's loggers print when a task fails: one line on the console (unless
    --debug); a handler that is not a console (Prefect's API handler: the UI) keeps it all."""
    import io
    import logging

    from exits.cli.support import quiet_tracebacks, set_debug

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record):
            self.lines.append(self.format(record))

    stream, keep = io.StringIO(), Keep()
    logger = logging.getLogger("exits.test.quiet")
    console = logging.StreamHandler(stream)
    logger.addHandler(console)
    logger.addHandler(keep)
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.delenv(DEBUG_ENV, raising=False)

    def log_failure():
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/a/x.json")
        except OSError:
            logger.exception("writing failed")

    try:
        set_debug(False)
        quiet_tracebacks()
        log_failure()
        assert stream.getvalue() == \
            "writing failed (OSError: [Errno 28] No space left on device: '/runs/a/x.json')\n"
        assert "Traceback" in keep.lines[0]
        set_debug(True)
        quiet_tracebacks()
        log_failure()
        assert "Traceback" in stream.getvalue()
    finally:
        set_debug(False)
        logger.removeHandler(console)
        logger.removeHandler(keep)


# --- through Prefect (a temporary server on a fresh PREFECT_HOME, shared by these tests) ----

@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults-prefect-home")


@pytest.mark.slow
def test_a_stage_that_cannot_write_is_one_line_inside_prefect(tiny_demo, prefect_home, tmp_path):
    """The first task's output path is a folder: Prefect's loggers print the task and flow
    failures (one line each, no traceback), then the command's one `error:` line."""
    work = tmp_path / "run"
    (work / "instances.parquet").mkdir(parents=True)
    done = subprocess.run(run_args(tiny_demo, work) + ["--set", "flows.retries=0"], env=fresh_user_env(prefect_home),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert one_error_line(done) == f"error: {work / 'instances.parquet'}: Is a directory (EISDIR)"
    assert "Starting temporary server" in done.stderr  # really failed inside the flow
    failed = [line for line in done.stderr.splitlines() if "Task run failed" in line]
    assert len(failed) == 1 and "IsADirectoryError" in failed[0]


def _servers_of(home: Path) -> list[int]:
    """Live (not zombie) Prefect server processes (uvicorn) started with PREFECT_HOME=home."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "environ", "status"]):
        info = proc.info
        if (info["status"] != psutil.STATUS_ZOMBIE and any("uvicorn" in c for c in info["cmdline"] or ())
                and (info["environ"] or {}).get("PREFECT_HOME") == str(home)):
            found.append(info["pid"])
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_sigkill_of_a_run_takes_its_temporary_server_along(tiny_demo, prefect_home, tmp_path):
    pytest.importorskip("psutil")
    data = tmp_path / "data"
    shutil.copytree(tiny_demo, data)
    work = tmp_path / "run"
    env = fresh_user_env(prefect_home)
    assert _servers_of(prefect_home) == []
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(run_args(data, work), env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not (work / "run.json").exists():  # written by the flow: the server is up
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
                time.sleep(0.2)
            servers = _servers_of(prefect_home)
            assert len(servers) == 1
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while _servers_of(prefect_home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _servers_of(prefect_home) == []

    # the same command again finishes; a file name that is not UTF-8 in the image folder is fine
    fd = os.open(os.path.join(os.fsencode(data / "images"), b"caf\xe9.png"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)
    done = subprocess.run(run_args(data, work), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads((work / "pseudo_labels.json").read_text())
    assert [a["id"] for a in out["annotations"]] == [a["id"] for a in json.loads((data / "instances.json").read_text())["annotations"]]
    assert _servers_of(prefect_home) == []


def test_run_with_a_paper_config_and_no_weights_stops_before_prefect(tmp_path):
    """`exits run -c coco` with no backbone.pretrained_path: one line naming the two ways on,
    exit 2, in about a second (no Prefect server started, nothing written)."""
    images = tmp_path / "images"
    images.mkdir()
    ann = tmp_path / "a.json"
    ann.write_text('{"images": [], "annotations": [], "categories": []}')
    exe = Path(sys.executable).with_name("exits")
    t = time.perf_counter()
    done = subprocess.run([str(exe), "run", "-i", str(images), "-a", str(ann), "-w", str(tmp_path / "run"), "-c", "coco"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PREFECT_HOME": str(tmp_path / "home")})
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: backbone.pretrained_path is not set")
    assert "--set backbone.pretrained_path=" in lines[0] and "--set backbone.allow_random_init=true" in lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "home").exists()
    assert time.perf_counter() - t < 60
