"""looplab.sweep against the Optuna study it returns: ranges, best trial, seeds, failures, pruning, shared storage."""
import math
import subprocess
import sys

import matplotlib.figure
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from looplab import DataLoaders, Learner
from looplab.lr_finder import LRFindResult
from looplab.metrics import accuracy

optuna = pytest.importorskip("optuna")
from looplab.sweep import choice, intuniform, loguniform, lr_space, sweep, uniform

optuna.logging.set_verbosity(optuna.logging.WARNING)

g = torch.Generator().manual_seed(0)
X = torch.randn(64, 6, generator=g)
Y = (X[:, 0] + X[:, 1] > 0).long()

SPACE = {"lr": loguniform(1e-4, 1.0), "hidden": intuniform(2, 16), "momentum": uniform(0.0, 0.95),
         "act": choice(["relu", "tanh"])}


def objective(params, cbs, n_epochs=2):
    torch.manual_seed(0)
    act = nn.ReLU() if params.get("act", "relu") == "relu" else nn.Tanh()
    model = nn.Sequential(nn.Linear(6, params.get("hidden", 8)), act, nn.Linear(params.get("hidden", 8), 2))
    dls = DataLoaders.from_tensors(X, Y, valid_pct=0.25, bs=16)
    learn = Learner(model, dls, F.cross_entropy, lr=params["lr"], metrics=[accuracy], progress=False, cbs=cbs,
                    opt_func=lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=params.get("momentum", 0)))
    learn.fit(n_epochs)
    return learn


def test_params_in_range_best_is_the_best_trial_and_table_plot():
    result = sweep(objective, SPACE, n_trials=6, seed=1)
    trials = result.trials
    assert [t["number"] for t in trials] == list(range(6))
    for t in trials:
        p = t["params"]
        assert 1e-4 <= p["lr"] <= 1.0 and 2 <= p["hidden"] <= 16 and isinstance(p["hidden"], int)
        assert 0 <= p["momentum"] <= 0.95 and p["act"] in ("relu", "tanh")
        assert t["state"] == "COMPLETE" and t["duration"] > 0
    best = min(trials, key=lambda t: t["value"])
    assert result.best_params == best["params"] and result.best_value == best["value"]
    # the value is valid_loss of the trial's last history row: refit the best trial and compare
    assert objective(result.best_params, []).recorder.history[-1]["valid_loss"] == pytest.approx(best["value"])
    assert result.study.best_trial.number == best["number"]
    table = result.table().splitlines()
    assert table[0].split()[:2] == ["number", "valid_loss"] and table[1].split()[0] == str(best["number"])
    assert isinstance(result.plot(), matplotlib.figure.Figure)


def test_same_seed_same_trials_tpe_too():
    for sampler in ("random", "tpe"):
        a = sweep(objective, {"lr": loguniform(1e-3, 1.0)}, n_trials=3, seed=7, sampler=sampler)
        b = sweep(objective, {"lr": loguniform(1e-3, 1.0)}, n_trials=3, seed=7, sampler=sampler)
        assert [t["params"] for t in a.trials] == [t["params"] for t in b.trials]
        assert [t["value"] for t in a.trials] == [t["value"] for t in b.trials]
    c = sweep(objective, {"lr": loguniform(1e-3, 1.0)}, n_trials=3, seed=8)
    assert [t["params"] for t in c.trials] != [t["params"] for t in a.trials]


def test_failing_trial_is_recorded_and_the_rest_complete():
    def flaky(params, cbs):
        if params["lr"] > 0.1:
            raise RuntimeError("diverged on purpose")
        return objective(params, cbs)

    with pytest.warns(RuntimeWarning, match="diverged on purpose"):
        result = sweep(flaky, {"lr": loguniform(1e-3, 1.0)}, n_trials=6, seed=0)
    states = [t["state"] for t in result.trials]
    failed = [t for t in result.trials if t["state"] == "FAIL"]
    assert failed and all(t["params"]["lr"] > 0.1 and "diverged on purpose" in t["error"] for t in failed)
    assert states.count("COMPLETE") == 6 - len(failed) and len(states) == 6
    assert result.best_params["lr"] <= 0.1


def test_median_pruner_stops_hopeless_trials_early():
    n_epochs = {}

    def long_objective(params, cbs):
        learn = objective(params, cbs, n_epochs=6)
        n_epochs[params["lr"]] = len(learn.recorder.history)
        return learn

    result = sweep(long_objective, {"lr": loguniform(1e-5, 1.0)}, n_trials=12, seed=3, pruner="median")
    pruned = [t for t in result.trials if t["state"] == "PRUNED"]
    assert pruned and all(n_epochs[t["params"]["lr"]] < 6 for t in pruned)
    assert all(n_epochs[t["params"]["lr"]] == 6 for t in result.trials if t["state"] == "COMPLETE")
    intermediate = result.study.trials[pruned[0]["number"]].intermediate_values
    assert sorted(intermediate) == [3 * (i + 1) for i in range(len(intermediate))]  # at train_iter: 3 steps an epoch


def test_log_dir_gets_one_tensorboard_run_per_trial_with_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2
    result = sweep(objective, {"lr": loguniform(1e-3, 1.0)}, n_trials=2, seed=0, log_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trial-0", "trial-1"]
    for t in result.trials:
        acc = EventAccumulator(str(tmp_path / f"trial-{t['number']}"), size_guidance={"tensors": 0})
        acc.Reload()
        raw = acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
        session = plugin_data_pb2.HParamsPluginData.FromString(raw).session_start_info
        assert session.hparams["lr"].number_value == pytest.approx(t["params"]["lr"])


SCRIPT = """
import optuna, torch
from torch import nn
from torch.nn import functional as F
from looplab import DataLoaders, Learner
from looplab.sweep import loguniform, sweep

def objective(params, cbs):
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    dls = DataLoaders.from_tensors(x, (x[:, 0] > 0).long(), valid_pct=0.25, bs=8)
    learn = Learner(nn.Linear(4, 2), dls, F.cross_entropy, lr=params["lr"], cbs=cbs, progress=False)
    learn.fit(1)
    return learn

optuna.logging.set_verbosity(optuna.logging.WARNING)
torch.set_num_threads(1)
sweep(objective, {{"lr": loguniform(1e-3, 1.0)}}, n_trials=3, storage={storage!r}, study_name="shared")
"""


def test_two_processes_share_one_sqlite_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'sweep.db'}"
    optuna.create_study(storage=storage, study_name="shared")  # created once, so neither process races to
    script = tmp_path / "run_sweep.py"
    script.write_text(SCRIPT.format(storage=storage))
    procs = [subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    study = optuna.load_study(study_name="shared", storage=storage)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(6))
    assert all(t.state.name == "COMPLETE" for t in study.trials)


def test_lr_space_is_around_the_valley_and_spaces_check_their_bounds():
    found = LRFindResult(lrs=[1e-3, 1e-2], losses=[1.0, 0.5], raw_losses=[1.0, 0.5], suggestions={"valley": 3e-3})
    space = lr_space(found, factor=10)
    assert isinstance(space, loguniform)
    assert math.isclose(space.low, 3e-4) and math.isclose(space.high, 3e-2)
    with pytest.raises(ValueError, match="loguniform low"):
        loguniform(0, 1)
    with pytest.raises(ValueError, match="intuniform high"):
        intuniform(5, 2)
    with pytest.raises(ValueError, match="space must be"):
        sweep(objective, {"lr": (1e-3, 1)}, n_trials=1)
    with pytest.raises(ValueError, match="metric 'nope'"):
        from looplab.sweep import _trial_value
        _trial_value(objective({"lr": 1e-2}, []), "nope")


def test_sweeps_sharing_a_study_with_one_seed_draw_different_trials(tmp_path):
    """Every process of a shared sweep runs the same script, seed included: they must not repeat each other."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    first = sweep(objective, {"lr": loguniform(1e-4, 1e-1)}, 3, seed=0, storage=storage, study_name="s")
    second = sweep(objective, {"lr": loguniform(1e-4, 1e-1)}, 3, seed=0, storage=storage, study_name="s")
    lrs = [t["params"]["lr"] for t in second.trials]
    assert len(lrs) == 6 and len(set(lrs)) == 6
    again = sweep(objective, {"lr": loguniform(1e-4, 1e-1)}, 3, seed=0)  # one process: the same seed repeats
    assert [t["params"]["lr"] for t in again.trials] == [t["params"]["lr"] for t in first.trials][:3]


def test_a_choice_holding_none_logs_its_trials(tmp_path):
    result = sweep(objective, {"lr": loguniform(1e-3, 1e-2), "extra": choice([None, "x"])}, 2, seed=1,
                   log_dir=tmp_path)
    assert [t["state"] for t in result.trials] == ["COMPLETE", "COMPLETE"]
    assert len(list(tmp_path.glob("trial-*"))) == 2
