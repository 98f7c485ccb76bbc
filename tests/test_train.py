import json
import re
from pathlib import Path

import pytest
import torch

from cmkg import models, stages
from cmkg.data import HandDataset, identity_collate, prepare_batch
from cmkg.errors import NumericalError
from cmkg.train import distillation_objective, fit, regression_objective


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from cmkg.data import synthesize

    out = tmp_path_factory.mktemp("d") / "src"
    synthesize(out, "rhd-like", 200, 32, seed=0, progress=False)
    return out


def _loader(root, modalities, batch=16):
    ds = HandDataset(root, "train", modalities)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True,
                                       collate_fn=identity_collate,
                                       generator=torch.Generator().manual_seed(0))


def test_smoke_training_decreases_the_training_loss(tiny_data):
    torch.manual_seed(0)
    model = models.build("resnet10", "depth")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = fit(model, regression_objective(model, "depth"), _loader(tiny_data, ("depth",)), opt,
                4, device=torch.device("cpu"), progress="none")
    losses = [h["train"]["loss"] for h in state.history]
    assert len(losses) == 4 and losses[-1] < 0.6 * losses[0]
    assert state.best_state is not None


def test_kd_objective_sums_its_named_parts(tiny_data):
    torch.manual_seed(0)
    student, teacher = models.build("resnet10", "rgb"), models.build("resnet10", "depth").eval()
    adapter = models.activation_adapter(student, teacher)
    assert isinstance(adapter, torch.nn.Identity)
    loss_fn = distillation_objective(models.StudentWithAdapter(student, adapter), teacher,
                                     losses=["act", "att"], lambda_att=1e3, att_layers=[1, 2, 3, 4])
    raw = HandDataset(tiny_data, "train", ("rgb", "depth")).__getitems__(list(range(8)))
    batch = prepare_batch(raw, torch.device("cpu"))
    parts = loss_fn(batch)
    assert set(parts) == {"loss", "reg", "act", "att", "dist"}
    torch.testing.assert_close(parts["loss"], parts["reg"] + parts["act"] + 1e3 * parts["att"])
    parts["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is frozen
    wide = models.activation_adapter(student, models.build("resnet50", "depth"))
    assert isinstance(wide, torch.nn.Conv2d) and wide.out_channels == 2048


def test_non_finite_loss_stops_with_stage_and_term(tiny_data):
    model = models.build("resnet10", "rgb")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def nan_loss(batch):
        pred, _ = model(batch["rgb"])
        reg = pred.sum() * float("nan")
        return {"loss": reg, "reg": reg}

    # 12 steps, checked every 5: the NaN of step 1 is found at step 5, the first check
    with pytest.raises(NumericalError, match=r"^student: loss L_REG became nan in epoch 1, "
                       r"steps 1-5 \(optim.lr=0.001 is probably too high; lower optim.lr\)$"):
        fit(model, nan_loss, _loader(tiny_data, ("rgb",)), opt, 1, device=torch.device("cpu"),
            stage="student", progress="none", check_every=5)



def test_weights_diverging_in_the_last_step_stop_at_validation(tiny_data):
    """One step an epoch: its loss is finite, the update it makes is not; validation finds it."""
    from cmkg.train import evaluate

    torch.manual_seed(0)
    model = models.build("resnet10", "depth")
    loader = _loader(tiny_data, ("depth",), batch=160)  # the 160 training samples: one step
    opt = torch.optim.SGD(model.parameters(), lr=1e30)
    with pytest.raises(NumericalError, match=r"^teacher: the weights became non-finite in epoch 1 "
                       r"\(validation EPE (nan|inf); optim.lr=1e\+30 is probably too high"):
        fit(model, regression_objective(model, "depth"), loader, opt, 1,
            device=torch.device("cpu"), stage="teacher", progress="none",
            validate=lambda: evaluate(model, loader, "depth", torch.device("cpu")))

def test_cli_diverging_loss_is_one_message_exit_2_and_no_partial(tmp_path, capsys):
    """optim.lr=1e8: one line naming the stage, the term and the key to lower; status 2; the
    stage's partial folder (its checkpoint) is gone, so nothing resumes the diverged run."""
    from cmkg import cli

    args = ["train", "teacher", "--config", "smoke", "--store", str(tmp_path / "runs"),
            "--set", f"data.root={tmp_path / 'data'}", "--set", "run.progress=none",
            "--set", "data.source.num=120", "--set", "optim.batch_size=16",
            "--set", "epochs.teacher=2", "--set", "run.threads=1", "--set", "optim.lr=1e8"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("cmkg: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.fullmatch(r"cmkg: error: teacher: loss L_REG became (nan|inf) in epoch 1, "
                        r"steps? [-\d]+ \(optim.lr=1e\+08 is probably too high; lower optim.lr\)",
                        lines[0]), lines[0]
    assert not list((tmp_path / "runs").glob("teacher/*.partial"))
    assert not list((tmp_path / "runs").glob("teacher/*/meta.json"))


def test_stage_pipeline_caches_and_records_provenance(tiny_cfg, capsys):
    kd = stages.run_stage("kd", tiny_cfg)
    meta, metrics = kd.meta, kd.metrics
    assert meta["stage"] == "kd" and set(meta["inputs"]) == {"teacher", "student"}
    assert meta["data"]["eval"] and meta["code_version"]
    assert (kd.path / "config.yaml").is_file() and (kd.path / "model.pt").is_file()
    assert metrics["test"]["epe_mm"] > 0 and len(metrics["history"]) == tiny_cfg.epochs.kd
    teacher = stages.Store(tiny_cfg.run.store).get("teacher", meta["inputs"]["teacher"]["key"])
    assert teacher is not None and teacher.meta["spec"]["modality"] == "depth"
    capsys.readouterr()
    again = stages.run_stage("kd", tiny_cfg)
    assert again.path == kd.path and "kd: cached" in capsys.readouterr().err
    # a change downstream (lambda) keeps the upstream teacher and student, retrains kd only
    import dataclasses

    other = dataclasses.replace(
        tiny_cfg, distill=dataclasses.replace(tiny_cfg.distill, lambda_att=10.0))
    k2, spec2, _ = stages.stage_key("kd", other)
    assert k2 != kd.key and spec2["inputs"] == {d: v["key"] for d, v in meta["inputs"].items()}
    assert stages.stage_key("teacher", other)[0] == meta["inputs"]["teacher"]["key"]
    # the reloaded student predicts like the artifact says
    net = kd.load_model()
    assert net.arch == "resnet10" and net.in_channels == 3
    assert metrics["mean_pose_test"]["epe_mm"] > 0


def test_cli_train_prints_the_stages_side_by_side(tiny_cfg, tmp_path, capsys):
    from cmkg import cli

    args = ["train", "kd", "--config", "smoke", "--store", str(tmp_path / "runs"),
            "--set", f"data.root={tmp_path / 'data'}", "--set", "run.progress=none",
            "--set", "data.source.num=240", "--set", "data.target.num=120",
            "--set", "optim.batch_size=16", "--set", "epochs.teacher=1",
            "--set", "epochs.student=1", "--set", "epochs.kd=1"]
    assert cli.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["stage", "backbone", "input", "test"]
    assert [ln.split()[0] for ln in lines[1:]] == ["teacher", "student", "kd"]
    for ln in lines[1:]:  # each row's EPE is the one its artifact folder records
        name, _, _, _, epe, _, _, path = ln.split()
        recorded = json.loads((Path(path) / "metrics.json").read_text())["test"]["epe_mm"]
        assert float(epe) == pytest.approx(recorded, abs=0.006), name


def test_cosine_schedule_decays_the_rate_to_zero_over_the_run():
    from cmkg.train import cosine_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = cosine_schedule(opt, total_steps=10)
    rates = [opt.param_groups[0]["lr"]]
    for _ in range(12):  # two steps past the end: the rate stays at 0
        opt.step()
        sched.step()
        rates.append(opt.param_groups[0]["lr"])
    assert rates[0] == pytest.approx(0.1) and rates[5] == pytest.approx(0.05)
    assert rates[10] == pytest.approx(0.0, abs=1e-12) and rates[12] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_keep_final_publishes_the_last_weights_not_the_best_validation_epoch(tiny_data):
    """A validation that is best at epoch 1 and worse after: best_val keeps epoch 1's weights,
    final keeps the last epoch's."""
    kept = {}
    for keep in ("best_val", "final"):
        torch.manual_seed(0)
        model = models.build("resnet10", "depth")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        epes = iter([1.0, 2.0, 3.0])
        state = fit(model, regression_objective(model, "depth"), _loader(tiny_data, ("depth",)),
                    opt, 3, device=torch.device("cpu"), progress="none", keep=keep,
                    validate=lambda it=epes: {"epe_mm": next(it), "auc_20_50": 0.0})
        kept[keep] = (state.best_epoch, state.best_epe, state.best_state)
        final = model.state_dict()
    assert kept["best_val"][:2] == (1, 1.0) and kept["final"][:2] == (3, 3.0)
    assert all(torch.equal(kept["final"][2][k], final[k]) for k in final)
    assert not all(torch.equal(kept["best_val"][2][k], final[k]) for k in final)


def test_validated_epochs_record_the_train_slice_epe(tiny_data):
    torch.manual_seed(0)
    model = models.build("resnet10", "depth")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    calls = []

    def on_train():
        calls.append(len(calls))
        return {"epe_mm": 10.0 + len(calls)}

    state = fit(model, regression_objective(model, "depth"), _loader(tiny_data, ("depth",)), opt,
                3, device=torch.device("cpu"), progress="none", eval_every=2,
                validate=lambda: {"epe_mm": 5.0, "auc_20_50": 0.0}, train_metrics=on_train)
    # epochs 2 and 3 validate (every 2nd, and the last); epoch 1 does not
    assert [h.get("train_eval") for h in state.history] == [
        None, {"epe_mm": 11.0}, {"epe_mm": 12.0}]
