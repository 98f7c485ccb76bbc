"""optim.keep: average: the published weights are the mean of the last epochs' states.

A toy network (linear, BatchNorm, linear) on a handful of fixed batches, trained with ``fit``
directly: the states at the end of each epoch are captured through the ``report`` callback and
averaged here, independently of the running sum ``fit`` keeps.
"""

import dataclasses
import io

import pytest
import torch
from torch import nn

from cmkg import config, stages
from cmkg.errors import ConfigError
from cmkg.train import FitState, cosine_schedule, fit

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """The toy's ops are tiny: a second intra-op thread only waits (seconds on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 4, generator=g)
        out.append({"x": x, "y": x[:, :2] * 2 - x[:, 2:]})
    return out


TRAIN, VAL = _batches(), _batches(2, seed=1)


def _setup(seed=0, momentum=0.9):
    torch.manual_seed(seed)
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)

    def loss_fn(batch):
        loss = nn.functional.mse_loss(model(batch["x"]), batch["y"])
        return {"loss": loss}

    def validate():
        was = model.training
        model.eval()
        with torch.no_grad():
            err = torch.cat([(model(b["x"]) - b["y"]).abs().flatten() for b in VAL]).mean()
        model.train(was)
        return {"epe_mm": 1000 * float(err), "auc_20_50": 0.0}

    return model, opt, loss_fn, validate


def _fit(model, opt, loss_fn, validate, epochs, **kw):
    return fit(model, loss_fn, TRAIN, opt, epochs, device=CPU, validate=validate,
               progress="none", **kw)


@pytest.mark.parametrize("average_epochs,averaged", [(3, [3, 4, 5]), (0, [4, 5])])
def test_published_weights_are_the_mean_of_the_last_epochs_states(average_epochs, averaged):
    model, opt, loss_fn, validate = _setup()
    seen = {}
    state = _fit(model, opt, loss_fn, validate, 5, keep="average", average_epochs=average_epochs,
                 report=lambda st: seen.__setitem__(st.epoch, {
                     k: v.detach().clone() for k, v in model.state_dict().items()}))
    assert sorted(seen) == [1, 2, 3, 4, 5]
    final = seen[5]
    for k, v in state.best_state.items():
        if v.is_floating_point():  # weights and BatchNorm running mean/var: the epochs' mean
            mean = torch.stack([seen[e][k].double() for e in averaged]).mean(0).to(v.dtype)
            torch.testing.assert_close(v, mean, rtol=1e-6, atol=1e-7)
        else:  # num_batches_tracked: the final value
            assert torch.equal(v, final[k]) and int(v) == 5 * len(TRAIN)
    # the average differs from the final weights, and the model keeps the final ones
    assert not torch.equal(state.best_state["net.0.weight"], final["net.0.weight"])
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
    # the average is validated once: its EPE is the state's best, recorded in the last epoch
    last = state.history[-1]
    assert last["average"]["epochs"] == averaged and "average" not in state.history[-2]
    model.load_state_dict(state.best_state)
    assert last["average"]["val"]["epe_mm"] == validate()["epe_mm"] == state.best_epe
    assert last["val"]["epe_mm"] != state.best_epe  # the last epoch's own val: final weights
    assert state.best_epoch == 5 and state.average_sum is None


def test_averaging_one_epoch_is_keep_final():
    kept = {}
    for keep, n in (("final", 0), ("average", 1)):
        model, opt, loss_fn, validate = _setup()
        kept[keep] = _fit(model, opt, loss_fn, validate, 3, keep=keep, average_epochs=n)
    a, f = kept["average"], kept["final"]
    assert a.best_state.keys() == f.best_state.keys()
    assert all(torch.equal(a.best_state[k], f.best_state[k]) for k in f.best_state)
    assert (a.best_epoch, a.best_epe) == (f.best_epoch, f.best_epe) == (3, f.history[-1]["val"]["epe_mm"])


class _Stop(Exception):
    pass


def test_a_run_resumed_from_a_checkpoint_gives_the_same_average_bit_for_bit():
    epochs, n, stop_after = 6, 4, 4  # epochs 3-6 averaged; the run stops with 3 and 4 summed

    def run(state=None, blob=None, report=None, seed=0):
        model, opt, loss_fn, validate = _setup(seed)
        sched = cosine_schedule(opt, epochs * len(TRAIN))
        if blob is not None:
            model.load_state_dict(blob["model"])
            opt.load_state_dict(blob["optimizer"])
            sched.load_state_dict(blob["scheduler"])
            state = blob["state"]
        return _fit(model, opt, loss_fn, validate, epochs, keep="average", average_epochs=n,
                    scheduler=sched, state=state,
                    report=None if report is None else lambda st: report(st, model, opt, sched))

    whole = run()
    saved = io.BytesIO()

    def checkpoint_then_stop(st, model, opt, sched):  # as cmkg.stages.run.checkpoint_blob
        if st.epoch == stop_after:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "state": st}, saved)
            raise _Stop

    with pytest.raises(_Stop):
        run(report=checkpoint_then_stop)
    saved.seek(0)
    blob = torch.load(saved, weights_only=False)
    assert isinstance(blob["state"], FitState) and blob["state"].averaged == [3, 4]
    resumed = run(blob=blob, seed=1)  # another init, overwritten by the checkpoint
    assert resumed.history[-1]["average"]["epochs"] == [3, 4, 5, 6]
    assert all(torch.equal(resumed.best_state[k], v) for k, v in whole.best_state.items())
    assert resumed.best_epe == whole.best_epe


def test_fit_rejects_more_epochs_to_average_than_it_trains():
    model, opt, loss_fn, validate = _setup()
    with pytest.raises(ValueError, match="average_epochs"):
        _fit(model, opt, loss_fn, validate, 3, keep="average", average_epochs=4)
    with pytest.raises(ValueError, match="keep"):
        _fit(model, opt, loss_fn, validate, 3, keep="mean")


# -- config and keys --------------------------------------------------------------------------

def _spec(cfg, stage="target"):
    return stages.stage_spec(stage, cfg, {"dep": "k"})


def test_keys_of_best_val_and_final_configs_are_unchanged(tmp_path):
    """average_epochs is in no key without keep: average; the optim section is what it was."""
    paper = config.load("paper", [f"data.root={tmp_path}"])
    assert _spec(paper)["optim"] == {"lr": 2.5e-4, "batch_size": 32, "weight_decay": 0.0}
    smoke = config.load("smoke", [f"data.root={tmp_path}"])
    assert _spec(smoke)["optim"] == {"lr": 1e-3, "batch_size": 32, "weight_decay": 0.0,
                                     "schedule": "cosine", "keep": "final"}
    # a value average_epochs could only take around validation changes no key either
    for cfg in (paper, smoke):
        odd = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, average_epochs=3))
        assert all(_spec(odd, s) == _spec(cfg, s) for s in stages.STAGES)


def test_keep_average_enters_the_key_with_the_count_it_averages(tmp_path):
    base = [f"data.root={tmp_path}", "epochs.target=4"]

    def key(*sets):
        spec = _spec(config.load("smoke", base + list(sets)))
        return config.digest(spec), spec["optim"]

    final, _ = key()
    half, optim = key("optim.keep=average")
    assert half != final and optim["keep"] == "average" and optim["average_epochs"] == 2
    assert key("optim.keep=average", "optim.average_epochs=1")[0] not in (half, final)
    # 0 is resolved per stage: the same average spelled out shares the key
    assert key("optim.keep=average", "epochs.kd=2", "epochs.meta=2",
               "optim.average_epochs=2")[0] == half
    cfg = config.load("smoke", base + ["optim.keep=average"])
    assert _spec(cfg, "kd")["optim"]["average_epochs"] == 1  # the smoke kd stage: 1 epoch


@pytest.mark.parametrize("sets,message", [
    (["optim.average_epochs=-1"], "optim.average_epochs: must be >= 0"),
    (["optim.keep=average", "optim.average_epochs=-2"], "optim.average_epochs: must be >= 0"),
    (["optim.average_epochs=2"], "optim.average_epochs: is read only with optim.keep=average"),
    (["optim.keep=average", "optim.average_epochs=2"],
     "optim.average_epochs: must be at most every stage's epochs, got 2 against epochs.kd=1, "
     "epochs.meta=1"),
])
def test_bad_average_epochs_give_one_clear_error(tmp_path, sets, message):
    f = tmp_path / "exp.yaml"
    f.write_text("preset: smoke\noptim:\n" + "".join(
        f"  {s.split('=')[0].split('.')[1]}: {s.split('=')[1]}\n" for s in sets))
    with pytest.raises(ConfigError) as e:
        config.load(str(f))
    text = str(e.value)
    assert str(f) in text and message in text
    assert text.count("optim.average_epochs") == 1


def test_a_sweep_reports_the_average_validation_of_an_averaged_stage():
    """A trial's val EPE and AUC are those of the published weights: with keep: average, the
    average's (the last record's ``average``), not the final weights' own ``val``."""
    from types import SimpleNamespace

    from cmkg.cluster.tune import _final_metrics

    final_val, avg_val = {"epe_mm": 30.0, "auc_20_50": 0.2}, {"epe_mm": 25.0, "auc_20_50": 0.4}
    history = [{"epoch": 1, "val": {"epe_mm": 40.0, "auc_20_50": 0.1}},
               {"epoch": 2, "val": final_val, "average": {"epochs": [2], "val": avg_val}}]
    art = SimpleNamespace(stage="target", key="k", metrics={
        "history": history, "best_epoch": 2, "best_val_epe_mm": 25.0,
        "test": {"epe_mm": 26.0, "auc_20_50": 0.35}})
    got = _final_metrics(art, SimpleNamespace(describe=lambda s, k: f"{s}/{k}"), 2)
    assert (got["val_epe_mm"], got["val_auc_20_50"]) == (25.0, 0.4)
    del history[-1]["average"]  # keep: final, as before
    art.metrics["best_val_epe_mm"] = 30.0
    got = _final_metrics(art, SimpleNamespace(describe=lambda s, k: f"{s}/{k}"), 2)
    assert (got["val_epe_mm"], got["val_auc_20_50"]) == (30.0, 0.2)
