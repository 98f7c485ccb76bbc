"""The meta and target stages end to end on a tiny config (Algorithms 1 and 2 wired up)."""

import dataclasses

import pytest
import torch

from cmkg import cli, stages
from cmkg.errors import UserError


def _with(cfg, **sections):
    """A copy of ``cfg`` with some fields of some sections replaced."""
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)
                                       for name, fields in sections.items()})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from cmkg import config

    tmp = tmp_path_factory.mktemp("meta")
    return config.load("smoke", [
        "data.source.num=200", "data.target.num=120", "optim.batch_size=16",
        "epochs.teacher=1", "epochs.student=1", "epochs.meta=1", "epochs.target=2",
        f"data.root={tmp / 'data'}", f"run.store={tmp / 'runs'}", "run.progress=none"])


def test_meta_stage_saves_phi_with_provenance(tiny):
    art = stages.run_stage("meta", tiny)
    meta = art.meta
    assert set(meta["inputs"]) == {"teacher", "student"} and meta["code_version"]
    assert meta["data"]["train"] and meta["spec"]["meta"]["inner_steps"] == 1
    reg = art.load_phi()
    assert reg.form == "weighted_l2" and reg.names and not any(r.requires_grad for r in reg.raw)
    phi = art.metrics["phi"]
    assert phi["count"] == sum(r.numel() for r in reg.raw)
    assert phi["max"] > phi["min"]  # phi moved away from its constant start
    assert (art.path / "config.yaml").is_file()


def test_target_with_zero_prior_equals_no_regularizer(tiny):
    """Algorithm 2 with phi = 0 (a meta stage with beta = 0) trains exactly like form=none."""
    frozen = stages.run_stage("meta", _with(tiny, meta={"beta": 0.0}))
    assert frozen.metrics["phi"]["max"] == 0.0 and frozen.metrics["phi"]["min"] == 0.0
    with_prior = stages.run_stage("target", _with(tiny, regularizer={"prior": str(frozen.path)}))
    plain = stages.run_stage("target", _with(tiny, regularizer={"form": "none"}))
    assert with_prior.path != plain.path
    a, b = with_prior.load_model().state_dict(), plain.load_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert with_prior.metrics["test"]["epe_mm"] == plain.metrics["test"]["epe_mm"]


@pytest.mark.parametrize("form", ["none", "l1", "l2", "weighted_l1", "weighted_l2"])
def test_every_table2_regularizer_runs_on_the_target(tiny, form):
    art = stages.run_stage("target", _with(tiny, regularizer={"form": form, "sigma": 1e-4}))
    spec = art.meta["spec"]
    assert spec["regularizer"]["form"] == form and spec["data"]["eval"]["domain"] == "stb-like"
    assert ("meta" in art.meta["inputs"]) == form.startswith("weighted")
    hist = art.metrics["history"]
    assert len(hist) == 2 and "prior" in hist[0]["train"]
    if form != "none":
        assert hist[-1]["train"]["prior"] != 0.0


def test_cli_target_with_explicit_prior_and_bad_inputs(tiny, tmp_path, capsys):
    prior = stages.run_stage("meta", tiny)
    base = ["train", "target", "--config", "smoke", "--store", tiny.run.store,
            "--set", f"data.root={tiny.data.root}", "--set", "run.progress=none",
            "--set", "data.source.num=200", "--set", "data.target.num=120",
            "--set", "optim.batch_size=16", "--set", "epochs.target=1"]
    assert cli.main(base + ["--set", "regularizer.form=weighted_l2",
                            "--set", f"regularizer.prior={prior.path}"]) == 0
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[0] == "target"
    from pathlib import Path

    target = stages.open_artifact(Path(row[-1]))
    assert target.meta["inputs"]["meta"] == {"key": prior.key, "path": str(prior.path)}
    # a prior learned for another backbone does not fit
    assert cli.main(base + ["--set", f"regularizer.prior={prior.path}",
                            "--set", "model.student=resnet18"]) == 2
    assert "does not fit the resnet18 student" in capsys.readouterr().err
    assert cli.main(base + ["--set", f"regularizer.prior={tmp_path}"]) == 2
    assert "regularizer.prior" in capsys.readouterr().err


def test_meta_needs_a_weighted_form(tiny):
    with pytest.raises(UserError, match="meta stage learns phi of a weighted form"):
        stages.run_stage("meta", _with(tiny, regularizer={"form": "l2"}, meta={"alpha": 1e-3}))


def test_fig5_histograms_from_artifacts(tiny, tmp_path):
    from cmkg import report

    prior = stages.run_stage("meta", tiny)
    with_r = stages.run_stage("target", tiny)
    without = stages.run_stage("target", _with(tiny, regularizer={"form": "none"}))
    out = tmp_path / "fig5.png"
    assert cli.main(["figure", "params", "--without", str(without.path), "--with",
                     str(with_r.path), "--prior", str(prior.path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    data = report.fig5_from_artifacts(without.path, with_r.path, prior.path, tmp_path / "b.png")
    n = sum(p.numel() for n_, p in without.load_model().named_parameters()
            if n_.endswith("weight") and p.dim() in (2, 4))
    # the central 99.9 % of the weights fall inside the drawn range
    assert 0.998 * n <= sum(data["theta_counts"]["w/o R"]) <= n
    assert sum(data["phi_counts"]) >= 0.998 * prior.metrics["phi"]["count"]
    # the prior's strength per layer, as the with-R run measured it after its last epoch
    last = with_r.metrics["history"][-1]["diagnostics"]["prior_strength"]["layers"]
    assert data["abs_d_median"] == {n_: v["abs_d_median"] for n_, v in last.items()}
    # a calibrated run: the phi drawn is the one it trained with (its phi_applied: phi_META x
    # its scale, then capped), not phi_META
    cal = stages.run_stage("target", _with(tiny, regularizer={"calibrate_d": 0.1}))
    scaled = report.fig5_from_artifacts(without.path, cal.path, prior.path, tmp_path / "d.png")
    applied = cal.metrics["phi_applied"]["hist"]
    assert (scaled["phi_edges"], scaled["phi_counts"]) == (applied["edges"], applied["counts"])
    scale = cal.metrics["calibration"]["scale"]
    assert scaled["phi_edges"][-1] <= scale * data["phi_edges"][-1] * (1 + 1e-6)  # the cap
    assert cli.main(["figure", "params", "--without", str(tmp_path), "--with", str(with_r.path),
                     "--out", str(tmp_path / "c.png")]) == 2


def test_fixed_point_meta_stage_publishes_phi_star(tiny):
    """meta.solve=fixed_point: the student's weights travel as under Algorithm 1 (theta on G; phi
    does not feed back into theta), phi is set once at the end, scaled to mean |phi| 1, and it
    respects what BatchNorm makes of a filter: G does not change when a conv filter followed by
    BatchNorm is rescaled, so theta . grad L_DIST over each such filter is 0, and so is
    sum_j phi*_j (theta_j^2 + eps_t) over it."""
    iterate = stages.run_stage("meta", tiny)
    art = stages.run_stage("meta", _with(tiny, meta={"solve": "fixed_point"}))
    assert art.path != iterate.path and art.meta["spec"]["meta"]["solve"] == "fixed_point"
    assert "beta" not in art.meta["spec"]["meta"]
    a, b = art.load_model().state_dict(), iterate.load_model().state_dict()
    # the same path up to summation order (grad G in one pass, not grad L_REG + grad L_DIST)
    assert max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm())
               for k in a if a[k].is_floating_point() and b[k].norm() > 0) < 1e-4
    reg = art.load_phi()
    phis = [p.detach().double() for p in reg.phi()]
    assert torch.cat([p.flatten() for p in phis]).abs().mean() == pytest.approx(1.0, rel=1e-6)
    from cmkg.diagnostics import FIRST_CONV  # followed by BatchNorm

    first = dict(zip(reg.names, phis))[FIRST_CONV]
    assert (first < 0).any() and (first > 0).any()
    theta = a[FIRST_CONV].double()
    sq = theta.pow(2)
    per_filter = (first * (sq + 0.1 * sq.mean())).sum((1, 2, 3))  # regularizer.phi_eps = 0.1
    assert per_filter.abs().max() < 1e-3 * (first.abs() * sq).sum((1, 2, 3)).max()
