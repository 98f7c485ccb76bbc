"""The phi diagnostics (docs/phi-diagnostics.md): the statistics on toys whose answer is known,
the meta variants they need (teacher-free G, data order, disjoint halves) and their keys, and
``cmkg phi`` end to end at the smallest scale."""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from cmkg import cli, config, phi_stats, regularizers, stages
from cmkg.errors import ConfigError, DataError, UserError
from cmkg.losses import regression_loss
from cmkg.meta import meta_iteration
from cmkg.report import phi as phi_report
from cmkg.stages.build import halves, order_seed, take

SHAPES = {"conv1.weight": (16, 3, 3, 3), "layer1.weight": (32, 16, 3, 3), "head.weight": (63, 32)}


def _state(rng, scale=1.0, offsets=None):
    """A random phi state; ``offsets``: a level per tensor (as layers differ in a real phi)."""
    offsets = offsets or {n: 0.0 for n in SHAPES}
    return {n: torch.from_numpy(offsets[n] + scale * rng.standard_normal(s)) for n, s in SHAPES.items()}


def _noisy(state, rng, sd):
    return {n: t + torch.from_numpy(sd * rng.standard_normal(tuple(t.shape)))
            for n, t in state.items()}


def test_a_planted_per_weight_signal_is_recovered_and_its_null_sits_at_zero():
    rng = np.random.default_rng(0)
    truth = _state(rng)
    a, b = _noisy(truth, rng, 1.0), _noisy(truth, rng, 1.0)  # two noisy copies: rho ~ 0.5
    c = phi_stats.compare(a, b, permutations=50, seed=1)
    assert 0.4 < c["rho"] < 0.6
    assert abs(c["null_mean"]) < 0.05 and c["null_sd"] < 0.05 and c["null_p95"] < 0.05
    assert c["z"] > 20 and c["p"] == pytest.approx(1 / 51) and phi_report.told(c) == "above"
    assert c["tensors"] == 3 and c["weights"] == sum(np.prod(s) for s in SHAPES.values())
    for t in c["per_tensor"]:  # every tensor carries the signal, every null is at 0
        assert t["rho"] > 0.3 and abs(t["null_mean"]) < 0.05, t
        # the permutations estimate the null's exact SD, 1 / sqrt(n - 1)
        assert t["null_sd_exact"] == pytest.approx(1 / np.sqrt(t["n"] - 1))
        assert t["null_sd"] == pytest.approx(t["null_sd_exact"], rel=0.35)
    assert c["null_sd"] == pytest.approx(c["null_sd_exact"], rel=0.35)
    # the summary is the size-weighted mean of the per-tensor rhos
    assert c["rho"] == pytest.approx(sum(t["n"] * t["rho"] for t in c["per_tensor"]) / c["weights"])


def test_independent_phis_sit_on_their_null_even_with_shared_tensor_levels():
    """Two phis with no per-weight relation but the same level per tensor (what two seeds' phi
    look like): pooled over all weights they correlate strongly, within tensors not at all;
    the within-tensor permutation null is what the statistic is compared with."""
    rng = np.random.default_rng(3)
    offsets = {"conv1.weight": -5.0, "layer1.weight": 0.0, "head.weight": 5.0}
    a, b = _state(rng, 1.0, offsets), _state(rng, 1.0, offsets)
    pooled = spearmanr(torch.cat([t.flatten() for t in a.values()]),
                       torch.cat([t.flatten() for t in b.values()])).statistic
    assert pooled > 0.5  # the levels alone
    c = phi_stats.compare(a, b, permutations=50, seed=2)
    assert abs(c["rho"] - c["null_mean"]) < 4 * c["null_sd"] and abs(c["rho"]) < 0.05
    assert abs(c["null_mean"]) < 0.05 and phi_report.told(c) == "null"


def test_weights_no_loss_reaches_are_left_out_so_shared_zeros_do_not_count_as_agreement():
    """Two unrelated phis that both stayed 0 (their start) on the same 80 % of a tensor, as the
    outer taps of a 3x3 convolution on 1x1 maps do: over all weights they agree far above the
    null; over the weights L_REG reaches (Fisher > 0) they sit on it."""
    rng = np.random.default_rng(7)
    dead = torch.from_numpy(rng.random(20000) < 0.8)
    a = {"w": torch.from_numpy(rng.standard_normal(20000) + 1.0).masked_fill(dead, 0.0)}
    b = {"w": torch.from_numpy(rng.standard_normal(20000) + 1.0).masked_fill(dead, 0.0)}
    fisher = {"w": torch.from_numpy(rng.random(20000)).masked_fill(dead, 0.0)}
    assert phi_report.told(phi_stats.compare(a, b, permutations=30)) == "above"
    live = phi_stats.live_weights(fisher)
    c = phi_stats.compare(a, b, permutations=30, live=live)
    assert c["weights"] + c["excluded"] == 20000 and c["excluded"] == int(dead.sum())
    assert abs(c["rho"] - c["null_mean"]) < 4 * c["null_sd"] and phi_report.told(c) == "null"
    assert phi_stats.order_free(a)["fraction_zero"] == pytest.approx(float(dead.double().mean()))


def test_spearman_handles_ties_like_scipy_and_constant_tensors_are_left_out():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 5, 300).astype(float)
    y = x + rng.integers(0, 3, 300)
    assert phi_stats.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert np.isnan(phi_stats.spearman(np.zeros(10), y[:10]))
    a = {"w": torch.zeros(50), "v": torch.from_numpy(x[:50])}
    b = {"w": torch.from_numpy(y[:50]), "v": torch.from_numpy(y[:50])}
    c = phi_stats.compare(a, b, permutations=20)
    assert c["skipped"] == ["w"] and c["tensors"] == 1 and c["weights"] == 50
    both = phi_stats.compare_all({"ab": (a, b), "bb": (b, b)}, permutations=20)
    assert both["ab"]["rho"] == c["rho"] and both["bb"]["rho"] == pytest.approx(1.0)
    assert both["bb"]["skipped"] == []
    with pytest.raises(ValueError, match="differ in their tensors"):
        phi_stats.compare(a, {"w": torch.zeros(50)})


def test_order_free_statistics():
    phi = {"a": torch.tensor([-2.0, -1.0, 1.0, 2.0]), "b": torch.tensor([3.0, -4.0])}
    s = phi_stats.order_free(phi)
    assert s["count"] == 6 and s["fraction_negative"] == pytest.approx(0.5)
    assert s["abs_p50"] == pytest.approx(2.0) and s["mean"] == pytest.approx(-1 / 6)


class Tiny(nn.Module):
    """A PoseNet-shaped toy with BatchNorm: (joints, activations)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, 63)

    def forward(self, x):
        a = torch.relu(self.bn(self.c1(x)))
        return self.head(a.flatten(1)).view(-1, 21, 3), [a]


def _batch(seed, n=6, depth=True):
    g = torch.Generator().manual_seed(seed)
    out = {"rgb": torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64),
           "target": torch.randn(n, 21, 3, generator=g, dtype=torch.float64)}
    if depth:
        out["depth"] = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    return out


def test_fisher_diagonal_is_the_mean_squared_per_batch_gradient_and_leaves_buffers():
    torch.manual_seed(0)
    model = Tiny().double()
    batches = [_batch(1), _batch(2)]
    before = {n: b.clone() for n, b in model.named_buffers()}
    names = ["c1.weight", "head.weight"]
    fisher = phi_stats.fisher_diagonal(model, batches, names)
    expected = {n: 0.0 for n in names}
    for b in batches:
        model.train()
        grads = torch.autograd.grad(regression_loss(model(b["rgb"])[0], b["target"]),
                                    [dict(model.named_parameters())[n] for n in names])
        for n, g in zip(names, grads):
            expected[n] = expected[n] + g.pow(2) / len(batches)
    for n in names:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-10, atol=0)
    for n, b in model.named_buffers():  # the helper's forwards left no trace (our own did)
        assert not torch.equal(b, before[n]) or n.endswith("num_batches_tracked")


def test_teacher_free_meta_iteration_has_no_teacher_terms_in_g():
    """meta.teacher=false: no teacher, no adapter, no depth in the batch; phi moves by the exact
    l = 1 meta-gradient of G = L_REG (-2 alpha theta_k * grad L_REG(theta_1)) and theta by an
    SGD step on grad L_REG(theta_k) alone."""
    torch.manual_seed(0)
    alpha, lr = 0.05, 1e-3
    student = Tiny().double()
    reg = regularizers.build("weighted_l2", student).double()
    with torch.no_grad():
        for r in reg.raw:
            r.uniform_(0.0, 0.5)
    batch = _batch(4, depth=False)
    theta0 = {n: p.detach().clone() for n, p in student.named_parameters()}
    phi0 = dict(zip(reg.names, (r.detach().clone() for r in reg.raw)))
    buffers = {n: b.clone() for n, b in student.named_buffers()}

    def l_reg(theta):
        pred, _ = torch.func.functional_call(student, {**theta, **buffers}, (batch["rgb"],))
        return regression_loss(pred, batch["target"])

    t0 = {n: t.clone().requires_grad_() for n, t in theta0.items()}
    g0 = dict(zip(t0, torch.autograd.grad(l_reg(t0), list(t0.values()))))
    t1 = {n: (theta0[n] - alpha * (g0[n] + (2 * phi0[n] * theta0[n] if n in phi0 else 0)))
          .requires_grad_() for n in theta0}
    g1 = dict(zip(t1, torch.autograd.grad(l_reg(t1), list(t1.values()))))

    theta_opt = torch.optim.SGD(student.parameters(), lr=lr)
    phi_opt = torch.optim.SGD(reg.parameters(), lr=1.0)
    parts = meta_iteration(student, None, None, reg, batch, theta_opt, phi_opt, alpha=alpha,
                           steps=1, first_order=False, losses=["act", "att"], lambda_att=1e3,
                           att_layers=[1])
    assert "act" not in parts and "att" not in parts
    assert float(parts["loss"]) == float(parts["reg"])  # G = L_REG
    for n, r in zip(reg.names, reg.raw):
        torch.testing.assert_close(r.detach(), phi0[n] + 2 * alpha * theta0[n] * g1[n],
                                   rtol=1e-9, atol=1e-13)
    for n, p in student.named_parameters():
        torch.testing.assert_close(p.detach(), theta0[n] - lr * g0[n].detach(), rtol=1e-9,
                                   atol=1e-13, msg=n)


def test_halves_are_disjoint_fixed_and_cover_the_split():
    for n in (0, 1, 7, 51, 1000):
        h = halves(n)
        a, b = set(h["half0"].tolist()), set(h["half1"].tolist())
        assert not a & b and a | b == set(range(n)) and len(a) == n // 2
        assert all(np.array_equal(h[k], halves(n)[k]) for k in h)  # deterministic
    assert not np.array_equal(halves(1000)["half0"], np.arange(500))  # not the first half


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The smallest meta chain: 64 source samples of 32 px, one epoch per stage."""
    tmp = tmp_path_factory.mktemp("phi")
    return config.load("smoke", [
        "data.source.num=64", "data.source.size=32", "data.target.num=20",
        "data.target.size=32", "optim.batch_size=8", "epochs.teacher=1", "epochs.student=1",
        "epochs.meta=1", f"data.root={tmp / 'data'}", f"run.store={tmp / 'runs'}",
        "run.progress=none", "run.threads=2"])


def _meta(cfg, **entries):
    return dataclasses.replace(cfg, meta=dataclasses.replace(cfg.meta, **entries))


def test_meta_variants_change_the_meta_key_only_when_set(tiny):
    key = stages.plan("meta", tiny)[-1].key
    spec = stages.plan("meta", tiny)[-1].spec
    assert not {"teacher", "order_seed", "subset"} & set(spec["meta"])  # defaults: keys as before
    assert stages.plan("meta", _meta(tiny, order_seed=tiny.run.seed))[-1].key == key
    variants = [_meta(tiny, teacher=False), _meta(tiny, order_seed=1000),
                _meta(tiny, subset="half0"), _meta(tiny, subset="half1")]
    keys = [stages.plan("meta", c)[-1].key for c in variants]
    assert len({key, *keys}) == 5
    for c in variants:  # the teacher and student they start from are the default run's
        up = {n.stage: n.key for n in stages.plan("meta", c)[:-1]}
        assert up.items() <= {n.stage: n.key for n in stages.plan("meta", tiny)[:-1]}.items()
    free = stages.plan("meta", variants[0])
    assert [n.stage for n in free] == ["student", "meta"] and "distill" not in free[-1].spec
    assert order_seed("meta", variants[1]) == 1000 and order_seed("student", variants[1]) == 0
    with pytest.raises(ConfigError, match="meta.subset"):
        config.load("smoke", ["meta.subset=half2"])


def _in_process(nodes, on_done):
    """The executor's contract, in this process: each node trained (or cached) in order."""
    store = stages.Store.of(nodes[0].cfg)
    done = {}
    for node in nodes:
        done[node.id] = stages.run_node(node, store, stages.upstream_of(node, done, store))
        on_done(node, str(done[node.id].path), None)


def test_teacher_free_meta_stage_trains_without_a_teacher_on_half_the_data(tiny):
    cfg = _meta(tiny, teacher=False, subset="half1")
    nodes = stages.plan("meta", cfg)
    store = stages.Store.of(cfg)
    art = stages.run_plan(nodes, store)
    assert set(art.meta["inputs"]) == {"student"}
    assert store.get("teacher", stages.plan("teacher", tiny)[-1].key) is None  # never trained
    hist = art.metrics["history"]
    assert "act" not in hist[0]["train"] and "att" not in hist[0]["train"]
    student = stages.upstream_of(nodes[-1], {}, store)
    run = stages.build_stage("meta", cfg, nodes[-1].spec, student, torch.device("cpu"))
    full = stages.build_stage("meta", _meta(tiny, teacher=False), nodes[-1].spec, student,
                              torch.device("cpu"))
    n = len(full.train_set)
    assert len(run.train_set) == n - n // 2
    np.testing.assert_array_equal(run.train_set.target, full.train_set.target[halves(n)["half1"]])
    sub = take(full.train_set, halves(n)["half0"])
    assert sub.__getitems__([0])["rgb"].shape[0] == 1 and len(sub) == n // 2


def test_cmkg_phi_end_to_end_at_the_smallest_scale(tiny, tmp_path, capsys):
    from cmkg.ablation import phi

    sets = [f"data.root={tiny.data.root}", f"run.store={tiny.run.store}", "data.source.num=64",
            "data.source.size=32", "data.target.num=20", "data.target.size=32",
            "optim.batch_size=8", "epochs.teacher=1", "epochs.student=1", "epochs.meta=1",
            "run.progress=none", "run.threads=2"]
    rep = tmp_path / "rep"
    assert phi.run("smoke", sets, seeds=1, report_dir=rep, permutations=20,
                   execute=_in_process) == 0
    doc = json.loads((rep / "results" / "phi.json").read_text())
    (rec,) = doc["records"]
    assert rec["status"] == "done" and set(rec["comparisons"]) == set(phi_report.COMPARISONS)
    assert rec["artifacts"]["full"] == stages.plan("meta", dataclasses.replace(
        tiny, run=dataclasses.replace(tiny.run, seed=0)))[-1].key  # Table 2's meta stage
    assert len(set(rec["artifacts"].values())) == 6
    for c in rec["comparisons"].values():
        assert c["permutations"] == 20 and c["tensors"] > 0 and -1 <= c["rho"] <= 1
    md = (rep / "phi.md").read_text()
    assert "## Reading" in md and "split-half, data order" in md and "teacher-free" in md
    before = {p: (rep / p).read_bytes() for p in ("phi.md", "phi.csv")}
    phi_report.render_phi(rep / "results", rep)  # the files come from the records alone
    assert {p: (rep / p).read_bytes() for p in before} == before
    csv_lines = (rep / "phi.csv").read_text().splitlines()
    assert csv_lines[0].startswith("seed,comparison,tensor") and len(csv_lines) > 7
    capsys.readouterr()
    # records of other seeds are not replaced without --force: exit 2, before any training
    rc = cli.main(["phi", "--config", "smoke", "--seeds", "2", "--report", str(rep),
                   *sum((["--set", s] for s in sets), [])])
    assert rc == 2 and "pass --force to replace them" in capsys.readouterr().err
    with pytest.raises(UserError, match="--workers 2"):
        phi.run("smoke", sets, seeds=1, report_dir=rep, workers=2, execute=_in_process)
    with pytest.raises(ConfigError, match="meta.subset"):
        phi.run("smoke", [*sets, "meta.subset=half0"], seeds=1, report_dir=rep,
                execute=_in_process)


GOLDEN = Path(__file__).parent / "golden" / "phi"


def _c(rho, sd=0.01, p=None, mean=0.0):
    """A hand-made comparison summary (one tensor of 10,000 weights)."""
    p = p if p is not None else (0.0099 if abs(rho - mean) > 3 * sd else 0.5)
    summary = {"rho": rho, "null_mean": mean, "null_sd": sd, "null_sd_exact": sd,
               "null_p95": mean + 1.645 * sd, "z": (rho - mean) / sd, "p": p}
    return {**summary, "weights": 10000, "excluded": 500, "tensors": 1, "skipped": [],
            "permutations": 100,
            "per_tensor": [{"name": "layer1.0.conv1.weight", "n": 10000, **summary}]}


def _doc():
    of = {"count": 10500, "fraction_negative": 0.37, "fraction_zero": 0.05, "mean": 1e-3,
          "std": 4e-3,
          "abs_p10": 1e-4, "abs_p50": 3.1e-3, "abs_p90": 8e-3, "abs_p99": 2e-2}
    variants = {"full": "as Table 2", "order": "another order", "half0": "half 0",
                "half1": "half 1", "no_teacher": "G = L_REG"}
    seed0 = {"order": _c(0.41), "halves": _c(0.30), "teacher": _c(0.10),
             "abs_theta": _c(0.02), "squared_change": _c(0.20), "fisher": _c(-0.15)}
    seed1 = {"order": _c(0.45), "halves": _c(0.28), "teacher": _c(0.44),
             "abs_theta": _c(0.01), "squared_change": _c(0.25), "fisher": _c(-0.12)}
    recs = [{"seed": s, "status": "done", "error": None, "comparisons": c,
             "artifacts": {v: f"{v}{s}" for v in variants}, "order_free": dict.fromkeys(variants, of)}
            for s, c in ((0, seed0), (1, seed1))]
    recs.append({"seed": 2, "status": "failed", "error": "meta 0123456789: RuntimeError: boom"})
    return {"kind": phi_report.KIND, "version": phi_report.VERSION, "preset": "cpu",
            "seeds": [0, 1, 2], "permutations": 100, "fisher_batches": 8, "variants": variants,
            "records": recs}


def test_readings_are_computed_from_the_numbers_and_the_files_match_golden(tmp_path):
    """Hand-made records whose answers are known: the order split-half above its null in both
    seeds; the teacher-free phi agrees less than the rerun in seed 0 (0.10 vs 0.41, null SD
    0.01), as much in seed 1 (0.44 vs 0.45); phi vs |theta| at its null; phi vs Fisher below."""
    doc = _doc()
    lines = dict(phi_report.readings(doc))
    assert lines["split-half, data order"].startswith("above the null in both seeds: ρ +0.410 … +0.450")
    assert "1 of 2 seeds the teacher-free φ agrees with the full φ less" in lines["teacher-free vs full"]
    assert "1 of 2 seeds it agrees at least as much" in lines["teacher-free vs full"]
    assert lines["φ vs |θ|"].startswith("not distinguishable from the null in both seeds")
    assert lines["φ vs Fisher"].startswith("below the null in both seeds")
    assert lines["teacher-free vs full"].startswith(
        "above the null in both seeds: ρ +0.100 … +0.440 vs null +0.000 ± 0.01; against a rerun "
        "with another order (ρ +0.410 … +0.450): in 1 of 2 seeds")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "phi.json").write_text(json.dumps(doc))
    written = phi_report.render_phi(tmp_path / "results", tmp_path)
    assert [p.name for p in written] == ["phi.md", "phi.csv"]
    got = (tmp_path / "phi.md").read_text(encoding="utf-8")
    assert "- seed 2: meta 0123456789: RuntimeError: boom" in got
    if os.environ.get("CMKG_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(parents=True, exist_ok=True)
        (GOLDEN / "phi.md").write_text(got, encoding="utf-8")
    assert got == (GOLDEN / "phi.md").read_text(encoding="utf-8")
    rows = (tmp_path / "phi.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 6 * 2  # header; per seed done and comparison: all + 1 tensor
    # a file that is not a phi record is a DataError naming it
    (tmp_path / "results" / "phi.json").write_text("{}")
    with pytest.raises(DataError, match="not a phi record file"):
        phi_report.render_phi(tmp_path / "results", tmp_path)


def _table_records(results: Path) -> None:
    """The smallest table records a report renders from (one done cell)."""
    from cmkg import report

    spec = {"table": "table1", "columns": [{"name": "kd", "metrics": ["epe_mm"]}],
            "rows": [{"label": "L_ACT", "paper": {}}]}
    report.write_records(results / "table1.parquet", spec, [
        {"table": "table1", "row": "L_ACT", "column": "kd", "seed": 0, "status": "done",
         "stage": "kd", "key": "k", "artifacts": {"kd": "k"}, "epe_mm": 20.0}])


def test_the_report_index_shows_the_diagnostics_iff_phi_json_exists(tmp_path):
    from cmkg import report

    results = tmp_path / "results"
    _table_records(results)
    written = report.render_reports(results, tmp_path)
    readme = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "φ diagnostics" not in readme and "phi.md" not in readme
    assert not (tmp_path / "phi.md").exists() and {p.name for p in written} == {
        "table1.md", "table1.csv", "README.md"}
    doc = _doc()
    (results / "phi.json").write_text(json.dumps(doc))
    written = report.render_reports(results, tmp_path)
    assert {"phi.md", "phi.csv", "README.md"} <= {p.name for p in written}
    readme = (tmp_path / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## φ diagnostics\n"):readme.index("## Notes")
                     if "## Notes" in readme else None]
    assert "Preset `cpu`; seeds 0, 1, 2; 2 measured, 1 failed" in section
    assert "[phi.md](phi.md)" in section and "[phi.csv](phi.csv)" in section
    # its readings are phi.md's, from the same records
    md = (tmp_path / "phi.md").read_text(encoding="utf-8")
    assert md == (GOLDEN / "phi.md").read_text(encoding="utf-8")
    reading = md[md.index("## Reading\n") + len("## Reading\n\n"):md.index("\n## Per-weight")]
    assert reading.strip() and reading in section
    assert "- **split-half, data order**: above the null in both seeds: ρ +0.410 … +0.450" \
        in section
    # the section comes from the records alone: no phi.json, no section
    (results / "phi.json").unlink()
    report.render_reports(results, tmp_path)
    assert "φ diagnostics" not in (tmp_path / "README.md").read_text(encoding="utf-8")
    # a phi.json that is not one: a DataError naming it, as for the tables' records
    (results / "phi.json").write_text("{}")
    with pytest.raises(DataError, match=r"phi\.json: not a phi record file"):
        report.render_reports(results, tmp_path)


def test_phi_artifacts_name_the_variants_meta_stages_and_their_student():
    doc = _doc()
    named = phi_report.artifacts(doc)
    assert len(named) == 2 * 5  # the failed seed names none; _doc names no student
    assert {(seed, stage) for seed, _, stage, _ in named} == {(0, "meta"), (1, "meta")}
    doc["records"][0]["artifacts"]["student"] = "s" * 64
    assert (0, "student", "student", "s" * 64) in phi_report.artifacts(doc)
    doc["records"][0]["artifacts"]["kd"] = "x"
    with pytest.raises(ValueError, match="artifact 'kd' is neither a variant"):
        phi_report.artifacts(doc)
