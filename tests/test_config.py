import subprocess
import sys
from pathlib import Path

import pytest

from cmkg import cli, config
from cmkg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(REPO.glob("cmkg/presets/*.yaml")) + sorted(REPO.glob("ablations/*.yaml")) \
    + sorted(REPO.glob("tune_spaces/*.yaml"))


def test_presets_are_shipped():
    assert {p.stem for p in REPO.glob("cmkg/presets/*.yaml")} == set(config.PRESETS)


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.parent.name == "presets"],
                         ids=lambda p: p.name)
def test_every_shipped_preset_loads(path):
    cfg = config.load(str(path))
    assert config.validate(cfg) == []
    # the preset by name resolves to defaults + the file
    by_name = config.load(path.stem)
    assert by_name.preset == path.stem
    assert {**by_name.to_dict(), "preset": None} == {**cfg.to_dict(), "preset": None}


def test_paper_defaults_follow_section_5_1():
    cfg = config.load("paper")
    assert (cfg.optim.lr, cfg.optim.batch_size) == (2.5e-4, 32)
    assert (cfg.epochs.teacher, cfg.epochs.student, cfg.epochs.kd) == (200, 100, 100)
    assert cfg.distill.lambda_att == 1e3 and cfg.data.source.size == 256


def test_experiment_file_is_a_diff_over_its_preset(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("preset: smoke\noptim:\n  lr: 1e-3\ndata:\n  target: {num: 50}\n")
    cfg = config.load(str(f), ["model.student=resnet18"])
    assert cfg.optim.lr == 1e-3 and cfg.model.student == "resnet18"
    assert cfg.data.target.num == 50 and cfg.data.target.domain == "stb-like"  # defaults kept
    assert cfg.data.source.size == 32  # from the smoke preset


def _problems(*args, **kw):
    with pytest.raises(ConfigError) as e:
        config.load(*args, **kw)
    return str(e.value)


def test_unknown_keys_wrong_types_and_ranges_are_all_reported(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  lr: -1\n  batchsize: 4\nepochs: {kd: two}\nmodel: {student: vgg}\n")
    msg = _problems(str(f))
    assert str(f) in msg
    assert "optim.batchsize: unknown key (did you mean 'batch_size'?)" in msg
    assert "epochs.kd: expected int, got 'two'" in msg
    assert "optim.lr: must be > 0" in msg
    assert "model.student: 'vgg' is not one of" in msg


def test_bad_set_missing_file_invalid_yaml_and_missing_data(tmp_path):
    assert "data.source.nmu: unknown key" in _problems("smoke", ["data.source.nmu=3"])
    assert "expected key=value" in _problems("smoke", ["optim.lr"])
    assert "file not found" in _problems(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "broken.yaml"
    bad.write_text("optim: [unclosed\n")
    assert "not valid YAML" in _problems(str(bad))
    assert "data.source.path" in _problems("smoke", [f"data.source.path={tmp_path}"])
    assert "data.split" in _problems("smoke", ["data.split=[0.5,0.1,0.1]"])
    assert "preset: must be one of" in _problems("smoke", ["preset=huge"])


def test_cli_bad_config_exits_2_without_traceback_or_output(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: zero}\n")
    store = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "cmkg", "train", "teacher", "--config", str(bad), "--store", str(store)],
        capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "optim.lr: expected float, got 'zero'" in proc.stderr and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not store.exists() and not (tmp_path / "data").exists()


def test_cli_synth_bad_arguments_exit_2(tmp_path, capsys):
    assert cli.main(["data", "synth", "--domain", "rhd-like", "--num", "0", "--out",
                     str(tmp_path / "x")]) == 2
    assert "--num" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as e:
        cli.main(["data", "synth", "--domain", "mars", "--num", "5", "--out", str(tmp_path / "y")])
    assert e.value.code == 2


def test_cli_eval_predictions_prints_json(tmp_path, capsys):
    import json

    import numpy as np

    gt = np.zeros((4, 21, 3))
    pred = gt.copy()
    pred[..., 2] = 10.0
    np.save(tmp_path / "p.npy", pred)
    np.save(tmp_path / "g.npy", gt)
    vis = np.ones((4, 21), bool)
    np.save(tmp_path / "v.npy", vis)
    assert cli.main(["eval-predictions", "--pred", str(tmp_path / "p.npy"), "--gt",
                     str(tmp_path / "g.npy"), "--vis", str(tmp_path / "v.npy")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epe_mm"] == 10.0 and out["pck"][3] == 0.0 and out["pck"][4] == 1.0
    np.save(tmp_path / "short.npy", gt[:, :20])
    assert cli.main(["eval-predictions", "--pred", str(tmp_path / "short.npy"), "--gt",
                     str(tmp_path / "g.npy")]) == 2
    assert "expected shape (N, 21, 3)" in capsys.readouterr().err


def test_loading_a_config_and_building_the_cli_import_no_torch():
    """config.load validates against torch-free vocabularies (cmkg.forms, cmkg.domains, the
    backbone and reduction names in cmkg.config), so a bad config fails at once and
    `cmkg --help` starts without torch, and without pyarrow (cmkg.storage imports it where a
    URI is opened): 0.28-0.42 s with it, 0.12-0.17 s without, on a loaded 2-core machine."""
    code = ("import sys; from cmkg import cli, config; config.load('cpu'); cli.build_parser(); "
            "bad = [m for m in ('torch', 'torchvision', 'pyarrow') if m in sys.modules]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_runs_and_report_import_no_torch(tmp_path):
    """`cmkg runs ls` and `cmkg report` read records and metadata only: no torch import."""
    results = Path(__file__).resolve().parent.parent / "reports" / "positive" / "results"
    code = ("import sys; from cmkg import cli; "
            f"assert cli.main(['runs', 'ls', '--store', {str(tmp_path / 'store')!r}]) == 0; "
            f"assert cli.main(['report', '--results', {str(results)!r}, "
            f"'--report', {str(tmp_path / 'report')!r}]) == 0; "
            "bad = [m for m in ('torch', 'torchvision') if m in sys.modules]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "report" / "positive.md").is_file()


@pytest.mark.parametrize("sets, says", [
    (["meta.solve=newton"], "must be one of iterate, fixed_point"),
    (["meta.solve=fixed_point", "meta.teacher=false"], "fixed_point needs the teacher"),
    (["meta.solve=fixed_point", "regularizer.phi_param=softplus"], "phi_param=free"),
])
def test_meta_solve_is_checked(sets, says):
    with pytest.raises(ConfigError, match="meta.solve") as err:
        config.load("smoke", sets)
    assert says in str(err.value)


def test_fixed_point_key_holds_what_it_reads():
    """meta.solve=fixed_point never takes a meta-gradient step: alpha and beta leave its key,
    regularizer.phi_eps (its eps) enters it; the default solve keeps the keys as they were."""
    from cmkg.stages.plan import stage_key

    base = config.load("smoke")
    fp = config.load("smoke", ["meta.solve=fixed_point"])
    assert stage_key("meta", fp)[0] != stage_key("meta", base)[0]
    assert stage_key("meta", config.load("smoke", ["meta.solve=iterate"]))[0] == \
        stage_key("meta", base)[0]
    for extra in (["meta.beta=0.5"], ["meta.alpha=0.1"]):
        assert stage_key("meta", config.load("smoke", ["meta.solve=fixed_point", *extra]))[0] == \
            stage_key("meta", fp)[0]
    assert stage_key("meta", config.load("smoke", ["meta.solve=fixed_point",
                                                   "regularizer.phi_eps=0.5"]))[0] != \
        stage_key("meta", fp)[0]
