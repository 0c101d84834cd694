"""Faults injected on purpose: each ends in a correct result or one clear line, never a silent
wrong number or a lost output (checkpoints, outputs, provenance, locks, tracking backend)."""
import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from pipeline.layout import Outputs
from pipeline import checkpoint, data, io
from pipeline.experiments import baseline, report
from pipeline.checkpoint import Checkpoint, code_digest
from pipeline.config import Params, TrackingConfig, parse_params
from pipeline.runlock import StageBusy, exclusive
from pipeline.tracking import TrackingError, stage_run
from helpers import RecordingTracker, tiny_params, tiny_settings

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_settings(baseline={"epochs": 2, "batch_size": 32, "last_n": 2})


# -- checkpoints ---------------------------------------------------------------------------------

def test_a_checkpoint_of_other_code_is_not_resumed(tmp_path, monkeypatch, capsys):
    saved = Checkpoint(tmp_path / "c.pt", "settings")
    assert saved.load() is None
    saved.save({"epoch": 3})
    assert Checkpoint(tmp_path / "c.pt", "settings").load() == {"epoch": 3}  # same code: resumed
    monkeypatch.setattr(checkpoint, "code_digest", lambda: "edited")
    assert Checkpoint(tmp_path / "c.pt", "settings").load() is None
    assert capsys.readouterr().err.strip() == f"{tmp_path / 'c.pt'}: written by other code, settings, data or device; starting over"


def test_the_code_digest_follows_every_source_file(tmp_path):
    for rel in ("pipeline/a.py", "pipeline/sub/b.py", "stages/c.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    first = code_digest.__wrapped__(tmp_path)
    (tmp_path / "pipeline/sub/b.py").write_text("x = 2\n")
    second = code_digest.__wrapped__(tmp_path)
    (tmp_path / "stages/c.py").write_text("x = 2\n")  # a stage entry point is code the checkpoint depends on
    assert len({first, second, code_digest.__wrapped__(tmp_path)}) == 3
    assert code_digest() == code_digest.__wrapped__(ROOT)  # the installed project's own source


def test_a_checkpoint_of_another_rank_count_is_not_resumed(tmp_path, monkeypatch):
    """Ranks normalise BatchNorm over their own rows: a state trained on 2 ranks is another run."""
    Checkpoint(tmp_path / "c.pt", "s").save({"epoch": 1})
    monkeypatch.setattr(checkpoint.data_parallel, "world_size", lambda: 2)
    assert Checkpoint(tmp_path / "c.pt", "s").load() is None
    Checkpoint(tmp_path / "c.pt", "s").save({"epoch": 2})
    assert Checkpoint(tmp_path / "c.pt", "s").load() == {"epoch": 2}
    monkeypatch.setattr(checkpoint.data_parallel, "world_size", lambda: 1)
    assert Checkpoint(tmp_path / "c.pt", "s").load() is None


def test_a_checkpoint_for_another_device_is_not_resumed(tmp_path):
    Checkpoint(tmp_path / "c.pt", "s").save({"epoch": 1})
    other = Checkpoint(tmp_path / "c.pt", "s")
    other.device = "cuda:some gpu"  # what load() on that device would set
    assert other.key != Checkpoint(tmp_path / "c.pt", "s").key


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", os.urandom(4096)], ids=["empty", "truncated", "random"])
def test_a_corrupt_checkpoint_is_one_line_and_a_fresh_start(tmp_path, capsys, content):
    path = tmp_path / "c.pt"
    Checkpoint(path, "s").save({"epoch": 1})
    path.write_bytes(content if content else b"")
    assert Checkpoint(path, "s").load() is None
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{path}: unreadable checkpoint (") and err.endswith("starting over") and "\n" not in err


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_is_never_executed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "c.pt", "wb") as handle:
        torch.save({"key": "k", "state": Payload()}, handle, pickle_module=pickle)
    assert Checkpoint(tmp_path / "c.pt", "s").load() is None
    assert not (tmp_path / "pwned").exists() and "unreadable checkpoint" in capsys.readouterr().err


def test_a_killed_baseline_resumed_by_other_code_starts_over(prepared, tmp_path, monkeypatch, capsys):
    paths = Outputs(tmp_path).baseline()
    params = tiny_params(TINY, baseline={"epochs": 2})
    ckpt = Checkpoint(paths.checkpoint, "x")
    ckpt.load()
    ckpt.save({"anything": 1})  # a checkpoint another program left
    metrics = baseline.run(params, prepared, paths)
    assert metrics["epochs_completed"] == 2 and "starting over" in capsys.readouterr().err


# -- outputs -----------------------------------------------------------------------------------

def test_same_tensors_same_bytes(tmp_path):
    state = {"w": torch.arange(10.0), "meta": {"a": 1}}
    io.save_torch(tmp_path / "a.pt", state)
    first = (tmp_path / "a.pt").read_bytes()
    io.save_torch(tmp_path / "a.pt", state)
    assert (tmp_path / "a.pt").read_bytes() == first


def test_outputs_get_the_users_umask_and_stale_temporaries_go(tmp_path):
    (tmp_path / ".m.json.abc123.tmp").write_text("killed mid-write")
    (tmp_path / ".figs.x1.tmp").mkdir()
    io.write_json(tmp_path / "m.json", {"a": 1})
    with io.atomic_dir(tmp_path / "figs") as tmp:
        (tmp / "f.png").write_bytes(b"png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figs", "m.json"]
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o666 & ~io.UMASK
    assert (tmp_path / "figs").stat().st_mode & 0o777 == 0o777 & ~io.UMASK


def test_replacing_a_folder_leaves_no_old_copy_and_spares_unrelated_hidden_files(tmp_path):
    """An existing output folder is replaced whole with no `.old` left; a killed write's `.old`
    and `.tmp` siblings of that target go; hidden files of other names beside it stay."""
    for content in (b"first", b"second"):
        with io.atomic_dir(tmp_path / "figs") as tmp:
            (tmp / "a.png").write_bytes(content)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figs"]
    (tmp_path / "figs").rename(tmp_path / ".figs.old")  # a write killed between its two renames
    (tmp_path / ".figs.q9.tmp").mkdir()
    for keep in (".figs", ".figsx.old", ".other.tmp", ".git"):
        (tmp_path / keep).write_text("not ours")
    with io.atomic_dir(tmp_path / "figs") as tmp:
        (tmp / "b.png").write_bytes(b"second")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".figs", ".figsx.old", ".git", ".other.tmp", "figs"]
    assert [p.name for p in (tmp_path / "figs").iterdir()] == ["b.png"]


def test_a_reused_lock_file_names_only_its_current_holder(tmp_path):
    """A lock file left by an earlier holder with a longer pid is rewritten, not appended to."""
    (tmp_path / "s.lock").write_text("123456789\nleftover\n")
    with exclusive("s", tmp_path):
        assert (tmp_path / "s.lock").read_text() == f"{os.getpid()}\n"


def test_a_full_disk_is_one_line_naming_the_output(tmp_path, monkeypatch):
    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(io.OutputError) as err:
        io.save_torch(tmp_path / "model.pt", {"w": torch.zeros(3)})
    assert str(err.value) == (f"{tmp_path / 'model.pt'}: could not be written (No space left on device); "
                              "free disk space or check the folder's permissions, then rerun")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


# -- diverged runs and provenance --------------------------------------------------------------

def test_a_diverged_baseline_reports_no_errors(prepared, tmp_path):
    params = tiny_params(TINY, baseline={"alpha": 1e6})
    paths = Outputs(tmp_path).baseline()
    metrics = baseline.run(params, prepared, paths)
    assert metrics["outcome"] == "diverged"
    for key in ("final_test_error", "mean_last_n_test_error", "best_val_error", "final_train_error"):
        assert metrics[key] is None, key
    assert "last_finite_epoch" not in metrics or metrics["last_finite_epoch"] < 1 + params.baseline.epochs
    (tmp_path / "metrics").mkdir(exist_ok=True)
    paths_report = Outputs(tmp_path).report()
    (tmp_path / "metrics/baseline.json").write_text(json.dumps(metrics))
    (tmp_path / "plots/baseline").mkdir(parents=True, exist_ok=True)
    paths.per_epoch.replace(tmp_path / "plots/baseline/errors.csv")
    report.run(tmp_path, paths=paths_report)
    assert "| baseline | n/a | n/a | 2 | n/a | n/a |" in paths_report.summary_md.read_text()


def test_the_dataset_tag_hashes_what_was_loaded(prepared, tmp_path, capsys):
    import shutil
    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    split = torch.load(copy / "train.pt", weights_only=True)
    split["y"] = split["y"].flip(0)  # replaced by hand: info.json no longer describes it
    torch.save(split, copy / "train.pt")
    tracker = RecordingTracker()
    info, _ = data.load_prepared(copy, torch.device("cpu"), tracker)
    on_disk = json.loads((copy / "info.json").read_text())["digest"]
    assert tracker.tags["dataset.digest"] == info["digest"] != on_disk
    assert "do not match info.json's digest" in capsys.readouterr().err


# -- one process per stage instance ------------------------------------------------------------

def test_a_second_instance_of_a_running_stage_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from pipeline.runlock import exclusive\n"
        f"with exclusive('drmad@-4.0', Path({str(tmp_path)!r})):\n print('held', flush=True); time.sleep(60)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StageBusy) as err:
            with exclusive("drmad@-4.0", tmp_path):
                pass
        assert str(err.value) == (f"stage drmad@-4.0 is already running (process {holder.pid}, lock "
                                  f"{tmp_path / 'drmad@-4.0.lock'}); wait for it to end or stop that process")
        with exclusive("drmad@-2.0", tmp_path):  # other instances run side by side
            pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive("drmad@-4.0", tmp_path):  # the dead holder's lock went with it
        pass


# -- the tracking backend failing mid-run ------------------------------------------------------

def params_for(experiment: str) -> Params:
    return Params(tracking=TrackingConfig(experiment=experiment))


def test_a_deleted_tracking_database_is_one_line(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    with pytest.raises(TrackingError) as err:
        with stage_run("baseline", params_for("deleted"), root=tmp_path) as run:
            db.unlink()
            run.log_metrics({"error/test": 0.1}, step=1)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"tracking at sqlite:///{db} failed (")


def test_a_killed_attempt_is_marked_and_linked(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    dead = subprocess.Popen([sys.executable, "-c", (
        "import os; from pathlib import Path\n"
        "from pipeline.config import Params, TrackingConfig; from pipeline.tracking import stage_run\n"
        f"with stage_run('baseline', Params(tracking=TrackingConfig(experiment='k')), root=Path({str(tmp_path)!r})):\n"
        " os._exit(9)")], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert dead.wait() == 9
    with stage_run("baseline", params_for("k"), root=tmp_path) as run:
        new_id = run.run_id
    client = MlflowClient(uri)
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("k").experiment_id])
            if r.info.run_name == "baseline"}
    killed = [r for r in runs.values() if r.info.run_id != new_id]
    assert [r.info.status for r in killed] == ["KILLED"]
    assert runs[new_id].data.tags["previous_attempt"] == killed[0].info.run_id
    assert runs[new_id].info.status == "FINISHED"


def test_a_run_that_diverges_after_finite_epochs_reports_them_under_their_own_keys():
    """The issue's case: finite test errors, NaN losses. Results null, last finite epoch kept."""
    rows = [{"epoch": e, "train_error": 0.5 / e, "val_error": 0.4 / e, "test_error": 0.45 / e, "train_loss": 1.0,
             "val_loss": 1.0, "test_loss": 1.0, "alpha": 1.0, "seconds": 1.0} for e in (1, 2)]
    rows.append({**rows[-1], "epoch": 3, "test_error": 0.8944, "train_loss": float("nan")})  # NaN model, finite error
    cfg = parse_params(TINY).baseline
    metrics = baseline.summarise(rows, cfg, "diverged", 3.0, 96)
    assert [metrics[k] for k in ("final_test_error", "mean_last_n_test_error", "best_val_error")] == [None] * 3
    assert (metrics["last_finite_epoch"], metrics["last_finite_test_error"]) == (2, 0.225)
    finished = baseline.summarise(rows[:2], cfg, "finished", 2.0, 64)
    assert (finished["final_test_error"], finished["best_val_error"]) == (0.225, 0.2)
    assert finished["mean_last_n_test_error"] == pytest.approx((0.45 + 0.225) / 2)


@pytest.mark.parametrize("fault", ["read-only database", "disk full", "server gone"])
def test_a_tracking_backend_failing_mid_run_is_one_line(tmp_path, monkeypatch, fault):
    """As root, permissions cannot make a file read-only here: the backend's own exception is
    injected where the run logs (the same translation the deleted database goes through)."""
    import requests
    from sqlalchemy.exc import OperationalError
    errors = {"read-only database": OperationalError("INSERT INTO metrics", {}, Exception("attempt to write a readonly database")),
              "disk full": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
              "server gone": requests.ConnectionError("Connection refused")}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    def broken(*args, **kwargs):
        raise errors[fault]
    with pytest.raises(TrackingError) as err:
        with stage_run("baseline", params_for(f"faults-{fault.split()[0]}"), root=tmp_path) as run:
            monkeypatch.setattr(run.client, "log_batch", broken)
            run.log_metrics({"error/test": 0.1}, step=1)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"tracking at {uri} failed ({type(errors[fault]).__name__}")
    monkeypatch.undo()
    client = MlflowClient(uri)  # the backend is back: the run was ended, not left RUNNING
    runs = client.search_runs([client.get_experiment_by_name(f"faults-{fault.split()[0]}").experiment_id])
    assert [r.info.status for r in runs if r.info.run_name == "baseline"] == ["FAILED"]
