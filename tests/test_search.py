"""The peers (random search, TPE): budget accounting, resume after a kill, nested MLflow trials."""
import json
import os

import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from pipeline.layout import Outputs
from pipeline import data, io
from pipeline.config import ConfigError, parse_params
from pipeline.experiments import search
from helpers import Interrupt, RecordingTracker, tiny_params, tiny_settings

TINY = tiny_settings(baseline={"epochs": 3, "batch_size": 32, "last_n": 2},
                     search={"trial_epochs": 1, "budget": 10, "tpe_startup_trials": 2})
TRIAL = 3  # gradient evaluations of a TINY trial: 1 epoch of 96 // 32 steps


def settings(**search_changes):
    return tiny_params(TINY, search=search_changes)


@pytest.mark.parametrize("budget", [10, 9, 3.5])
def test_two_samplers_given_one_budget_spend_it_within_one_trial(prepared, tmp_path, budget):
    spent = {}
    for name in ("random", "tpe"):
        paths = Outputs(tmp_path).search(name)
        metrics = search.run(settings(budget=budget), prepared, name, paths)
        trials = pd.read_csv(paths.trials_csv)
        assert metrics["trials"] == len(trials) and metrics["trial_gradient_equivalents"] == TRIAL
        assert metrics["work_gradient_equivalents"] == trials["work_gradient_equivalents"].sum()
        spent[name] = metrics["work_gradient_equivalents"]
        assert budget - TRIAL < spent[name] <= budget
    assert spent["random"] == spent["tpe"]


def test_the_chosen_trial_is_the_best_and_trials_differ(prepared, tmp_path):
    paths = Outputs(tmp_path).search("random")
    metrics = search.run(settings(), prepared, "random", paths)
    trials = pd.read_csv(paths.trials_csv)
    best = json.loads(paths.best.read_text())
    assert trials["log10_l2"].nunique() == len(trials) == 3
    assert best["val_error"] == trials["val_error"].min() == metrics["best_val_error"]
    assert best["trial"] == trials.loc[trials["val_error"].idxmin(), "trial"]
    assert best["alpha"] == pytest.approx(10 ** trials.loc[trials["val_error"].idxmin(), "log10_alpha"])
    low, high = TINY.get("search", {}).get("space", {}).get("log10_l2", [-7.0, -1.0])
    assert trials["log10_l2"].between(low, high).all()


@pytest.mark.parametrize("name", ["random", "tpe"])
def test_a_search_killed_mid_study_resumes_with_its_finished_trials(prepared, tmp_path, name):
    params = settings(budget=12)  # 4 trials
    straight = Outputs(tmp_path / "straight").search(name)
    expected = search.run(params, prepared, name, straight)
    resumed = Outputs(tmp_path / "resumed").search(name)
    with pytest.raises(Interrupt):
        search.run(params, prepared, name, resumed, tracker=RecordingTracker(stop_at_trial=2))
    storage = f"sqlite:///{resumed.storage_dir / f'{name}.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    kept = [t.params for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert len(kept) == 2 and not resumed.metrics.exists()

    got = search.run(params, prepared, name, resumed)
    assert pd.read_csv(resumed.trials_csv)[["log10_l2"]].head(2).to_dict("records") == kept
    # the finished trials were kept, not redone, and the resumed study drew what an uninterrupted one did
    table = pd.read_csv(resumed.trials_csv)
    assert table["trial"].tolist() == [0, 1, 2, 3]  # numbered as finished: the dead attempt's trial leaves no gap
    assert table.drop(columns=["wall_time_s"]).equals(pd.read_csv(straight.trials_csv).drop(columns=["wall_time_s"]))
    assert {k: v for k, v in got.items() if "wall" not in k} == {k: v for k, v in expected.items() if "wall" not in k}
    assert resumed.best.read_bytes() == straight.best.read_bytes()  # what final@search reads: byte for byte


def test_a_changed_budget_opens_a_new_study(prepared, tmp_path):
    """`budget: drmad` names a value that the drmad runs decide: the study is keyed by that value,
    so a smaller DrMAD spend after a finished search gives what a fresh search at it gives, and
    never more work than the budget."""
    params = tiny_params(TINY, search={"budget": "drmad"}, drmad={"inits": [-4.0]})

    def spend(root, work):
        io.write_json(root / "metrics/drmad/-4.0.json", {"work_gradient_equivalents": work})

    reused, fresh = tmp_path / "reused", tmp_path / "fresh"
    spend(reused, 12.0)
    search.run(params, prepared, "random", Outputs(reused).search("random"), root=reused)  # 4 trials
    spend(reused, 6.0)
    spend(fresh, 6.0)
    smaller = search.run(params, prepared, "random", Outputs(reused).search("random"), root=reused)
    alone = search.run(params, prepared, "random", Outputs(fresh).search("random"), root=fresh)
    assert smaller["trials"] == 2 and smaller["work_gradient_equivalents"] <= smaller["budget_gradient_equivalents"] == 6
    assert {k: v for k, v in smaller.items() if "wall" not in k} == {k: v for k, v in alone.items() if "wall" not in k}


def test_a_budget_below_one_trial_is_a_clear_error(prepared, tmp_path):
    with pytest.raises(ConfigError, match="search.trial_epochs: one trial costs 3 gradient evaluations"):
        search.run(settings(budget=2), prepared, "random", Outputs(tmp_path).search("random"))


def test_budget_drmad_reads_what_each_init_spent(tmp_path):
    params = parse_params({**TINY, "search": {"budget": "drmad"}, "drmad": {"inits": [-4, -2.0]}})
    with pytest.raises(ConfigError, match=r"no result for init\(s\) \[-4.0, -2.0\]"):
        search.budget(params, tmp_path)
    (tmp_path / "metrics/drmad").mkdir(parents=True)
    for tag, work in (("-4", 300.0), ("-2.0", 340.0), ("-7.0", 1000.0)):  # -7 is not an init here
        (tmp_path / f"metrics/drmad/{tag}.json").write_text(json.dumps({"work_gradient_equivalents": work}))
    assert search.budget(params, tmp_path) == 320.0


def test_a_trial_whose_worker_stops_beating_is_failed_and_redone(prepared, tmp_path):
    """A helper killed mid-trial (as on another machine: nothing local tells the stage it died)
    leaves its trial RUNNING; its heartbeat stops, and the stage fails it and runs another."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in tiny_settings(TINY, search={"budget": 3 * 3 * 40, "trial_epochs": 40, "heartbeat_s": 1,
                                                  "samplers": ["random"], "storage": f"sqlite:///{tmp_path / 'study.db'}"},
                                    adaptive={"variants": {"k100": {"every": 2, "window": 2}}}).items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    shutil.copytree(prepared, tmp_path / "data/prepared")
    env = {**os.environ, "PYTHONPATH": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "stages.search", "--sampler", "random"]
    helper = subprocess.Popen([*command, "--worker"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    stage = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    deadline = time.monotonic() + 120
    while True:  # both are training a trial: the stage opened the study before the helper dies
        assert time.monotonic() < deadline and helper.poll() is None and stage.poll() is None
        try:  # the workers may be creating the schema right now: look again
            studies = optuna.get_all_study_summaries(storage) if (tmp_path / "study.db").exists() else []
            running = {t.user_attrs.get("worker", "").rpartition(":")[2] for t in optuna.load_study(
                study_name=studies[0].study_name, storage=storage).get_trials(states=(TrialState.RUNNING,))} if studies else set()
        except SQLAlchemyError:
            studies, running = [], set()
        if {str(helper.pid), str(stage.pid)} <= running:
            break
        time.sleep(0.2)
    os.kill(helper.pid, signal.SIGKILL)
    helper.wait()
    _, err = stage.communicate(timeout=120)
    assert stage.returncode == 0, err
    study = optuna.load_study(study_name=studies[0].study_name, storage=storage)
    by_state = {s: [t for t in study.trials if t.state == s] for s in TrialState}
    assert len(by_state[TrialState.COMPLETE]) == 3 and not by_state[TrialState.RUNNING]
    (dead,) = by_state[TrialState.FAIL]
    assert dead.user_attrs["worker"].endswith(f":{helper.pid}")
    assert json.loads((tmp_path / "metrics/search/random.json").read_text())["trials"] == 3


def test_a_trial_past_the_plan_is_never_reported(prepared, tmp_path):
    """A racing worker's surplus trial that finished anyway: the outputs keep to the plan, so the
    work reported never exceeds the budget."""
    params, paths = settings(budget=6), Outputs(tmp_path).search("random")
    first = search.run(params, prepared, "random", paths)  # 2 trials of 3
    storage = f"sqlite:///{paths.storage_dir / 'random.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    extra = study.get_trials(states=(TrialState.COMPLETE,))[0]
    study.add_trial(optuna.trial.create_trial(params={"log10_l2": -5.0},
                                              distributions=extra.distributions, value=0.0,
                                              user_attrs={**extra.user_attrs}))  # the best of all, but surplus
    again = search.run(params, prepared, "random", paths)
    assert again["trials"] == 2 and again["work_gradient_equivalents"] <= 6 and again["best_val_error"] > 0.0
    assert {k: v for k, v in again.items() if "wall" not in k} == {k: v for k, v in first.items() if "wall" not in k}


def test_the_trial_cost_on_a_split_that_batches_do_not_divide(tmp_path):
    """100 training images in batches of 32: an epoch is 3 steps (the partial batch is dropped), so
    a budget of 7 buys 2 one-epoch trials, each reporting the 3 gradient evaluations it cost."""
    uneven = tiny_settings(TINY, data={"train_size": 100}, search={"budget": 7})
    params = parse_params(uneven)
    data.prepare(params.data, tmp_path / "prepared")
    assert search.trial_cost(params, data.load_info(tmp_path / "prepared")) == 3
    got = search.run(params, tmp_path / "prepared", "random", Outputs(tmp_path).search("random"))
    trials = pd.read_csv(tmp_path / "plots/search/random/trials.csv")
    assert got["trials"] == 2 and trials["work_gradient_equivalents"].tolist() == [3.0, 3.0]
    assert got["work_gradient_equivalents"] == 6.0 <= got["budget_gradient_equivalents"]


def test_a_trial_left_running_by_a_dead_local_process_is_failed_on_reopening(tmp_path):
    """Without waiting 2 x heartbeat_s: the process named on the trial is gone from this machine."""
    import socket
    import subprocess
    import sys
    params, paths = settings(budget=6), Outputs(tmp_path).search("random")
    study = search.open_study("random", params, {"digest": "d"}, paths, 6.0)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = f"{socket.gethostname()}:{os.getppid()}"  # a live process of this machine (pytest's parent)
    for worker in (f"{socket.gethostname()}:{dead.pid}", alive):
        trial = study.ask()
        trial.set_user_attr("worker", worker)
    reopened = search.open_study("random", params, {"digest": "d"}, paths, 6.0)
    states = {t.user_attrs["worker"]: t.state for t in reopened.get_trials()}
    assert states == {f"{socket.gethostname()}:{dead.pid}": TrialState.FAIL, alive: TrialState.RUNNING}


def test_two_workers_one_place_one_trial_completes_the_other_is_pruned(prepared, tmp_path, monkeypatch):
    """The last place of the plan goes to the earliest trial: when another worker asks between this
    worker's look at the plan and its own ask, this worker's trial is pruned unrun, and the plan
    (here one trial) is kept."""
    import socket
    params, paths = settings(budget=3), Outputs(tmp_path).search("random")  # one trial of 3
    info, _ = data.load_prepared(prepared, torch.device("cpu"))
    study = search.open_study("random", params, info, paths, 3.0)  # the study the stage opens
    others, real_sampler = [], search.sampler

    def other_worker_asks_first(*args, **kwargs):  # called after the look at the plan, before the ask
        if not others:
            others.append(study.ask(search.distributions(params, "random")))
            others[0].set_user_attr("worker", f"{socket.gethostname()}:{os.getppid()}")  # alive, elsewhere
        return real_sampler(*args, **kwargs)
    monkeypatch.setattr(search, "sampler", other_worker_asks_first)
    assert search.run(params, prepared, "random", paths, worker_only=True) is None

    def states():  # read afresh: a Study caches the trials it has seen
        return [t.state for t in optuna.load_study(study_name=study.study_name, storage=optuna.storages.RDBStorage(
            f"sqlite:///{paths.storage_dir / 'random.db'}")).get_trials()]
    assert states() == [TrialState.RUNNING, TrialState.PRUNED]  # ours: unrun
    for key, value in {"work": 3.0, "outcome": "finished", "seconds": 0.1, "test_error": 0.5}.items():
        others[0].set_user_attr(key, value)
    study.tell(others[0], 0.4)
    got = search.run(params, prepared, "random", paths)
    assert got["trials"] == 1 and got["work_gradient_equivalents"] == 3.0 and got["best_val_error"] == 0.4
    assert states() == [TrialState.COMPLETE, TrialState.PRUNED]


def test_the_plain_searches_stay_in_drmads_space_and_the_step_ones_search_the_step(prepared, tmp_path):
    """random and tpe tune the global L2 alone, at the baseline's step size, as DrMAD does; their
    `-step` twins search the step size too (a second, labelled row of the verdict)."""
    params = settings(budget=6, samplers=["random", "random-step"])
    for name in ("random", "random-step"):
        search.run(params, prepared, name, Outputs(tmp_path).search(name))
    plain = pd.read_csv(tmp_path / "plots/search/random/trials.csv")
    step = pd.read_csv(tmp_path / "plots/search/random-step/trials.csv")
    assert len(plain) == len(step) == 2
    assert plain["log10_alpha"].tolist() == [0.0, 0.0]  # the baseline's alpha 1.0
    assert step["log10_alpha"].nunique() == 2 and not (step["log10_alpha"] == 0.0).any()
    best = json.loads((tmp_path / "results/search/random/best.json").read_text())
    assert best["alpha"] == pytest.approx(params.baseline.alpha)
    assert set(search.distributions(params, "tpe")) == {"log10_l2"}
    assert set(search.distributions(params, "tpe-step")) == {"log10_l2", "log10_alpha"}
