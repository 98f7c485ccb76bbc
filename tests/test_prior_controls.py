"""phi as the target applies it: strength, sign, the controls at matched strength
(``regularizers.applied``), their keys, the other seed's meta stage in the plan, and Table 2's
rows that follow another row's choice (docs/prior-strength.md)."""

import dataclasses

import pytest
import torch

from cmkg import config, regularizers, stages
from cmkg.config import ConfigError
from cmkg.errors import UserError
from cmkg.stages.plan import prior_seed


def _phis(seed: int = 0) -> list[torch.Tensor]:
    """Three tensors of a made-up phi, a third of it negative (as phi_META is)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * 1e-3 + 3e-4
            for shape in ((4, 3, 3, 3), (5, 4), (7,))]


def _reg(phis: list[torch.Tensor], phi_param: str = "free") -> regularizers.Regularizer:
    reg = regularizers.Regularizer("weighted_l2", {f"t{i}": p.shape for i, p in enumerate(phis)},
                                   phi_param=phi_param, phi_init=1.0)
    reg.set_phi(phis)
    return reg


def _with(cfg, **sections):
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)
                                       for name, fields in sections.items()})


# ------------------------------------------------------------------ the transforms of phi

def test_permuted_keeps_each_tensors_values_and_changes_their_order():
    phis = _phis()
    out = regularizers.permuted(phis, seed=3)
    for p, q in zip(phis, out):
        assert q.shape == p.shape
        assert torch.equal(torch.sort(q.flatten()).values, torch.sort(p.flatten()).values)
        assert not torch.equal(q, p)  # the same histogram per tensor, another order
    again = regularizers.permuted(phis, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(out, again))  # deterministic from the seed
    other = regularizers.permuted(phis, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(out, other))


def test_uniform_is_a_constant_with_the_same_mean():
    phis = _phis()
    out = regularizers.uniform(phis)
    flat = torch.cat([p.flatten() for p in phis]).double()
    values = torch.cat([q.flatten() for q in out]).double()
    assert values.unique().numel() == 1
    assert float(values.mean()) == pytest.approx(float(flat.mean()), rel=1e-6)
    assert [q.shape for q in out] == [p.shape for p in phis]


def test_positive_sign_drops_the_negative_entries_and_keeps_the_rest():
    phis = _phis()
    out = regularizers.positive_part(phis)
    for p, q in zip(phis, out):
        assert (q >= 0).all()
        assert torch.equal(q[p > 0], p[p > 0])
        assert (q[p <= 0] == 0).all()
    assert any((p < 0).any() for p in phis)  # the test has negative entries to drop


def test_applied_order_strength_sign_control():
    phis = _phis()
    reg = _reg(phis)
    assert regularizers.applied(reg) is reg  # the defaults: phi_META itself (the paper)
    assert regularizers.applied(reg, control="other_seed") is reg  # another meta stage's phi
    scaled = regularizers.applied(reg, strength=100.0)
    assert all(torch.allclose(a, 100.0 * p) for a, p in zip(scaled.phi(), phis))
    # uniform after strength and sign: the mean of 100 x max(phi, 0)
    uni = regularizers.applied(reg, strength=100.0, sign="positive", control="uniform")
    want = float(torch.cat([100.0 * p.clamp_min(0).flatten() for p in phis]).double().mean())
    assert float(uni.phi()[0].detach().flatten()[0]) == pytest.approx(want, rel=1e-6)
    perm = regularizers.applied(reg, strength=10.0, sign="positive", control="permuted", seed=1)
    assert all(torch.equal(torch.sort(a.flatten()).values,
                           torch.sort((10.0 * p).clamp_min(0).flatten()).values)
               for a, p in zip(perm.phi(), phis))
    # applied phi is free whatever learned it: a positive part may hold zeros
    soft = _reg([p.abs() + 1e-6 for p in phis], phi_param="softplus").requires_grad_(False)
    out = regularizers.applied(soft, sign="positive", control="permuted", seed=0)
    assert out.phi_param == "free" and out.names == soft.names
    assert not any(r.requires_grad for r in out.raw)  # frozen like the loaded phi_META
    with pytest.raises(ValueError, match="sign"):
        regularizers.applied(reg, sign="negative")


# ------------------------------------------------------------------ config, keys and the plan

@pytest.mark.parametrize("sets, key", [
    (["regularizer.strength=0"], "regularizer.strength"),
    (["regularizer.strength=-1"], "regularizer.strength"),
    (["regularizer.strength=10", "regularizer.calibrate_d=0.1"], "regularizer.strength"),
    (["regularizer.sign=negative"], "regularizer.sign"),
    (["regularizer.phi_control=shuffled"], "regularizer.phi_control"),
    (["regularizer.prior_seed=3"], "regularizer.prior_seed"),  # without other_seed
    (["regularizer.phi_control=other_seed", "regularizer.prior_seed=-1"],
     "regularizer.prior_seed"),
])
def test_bad_prior_entries_name_their_key(sets, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load("smoke", sets)


def test_other_seed_cannot_take_an_explicit_prior(tmp_path):
    (tmp_path / "phi.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"regularizer\.phi_control: other_seed"):
        config.load("smoke", ["regularizer.phi_control=other_seed",
                              f"regularizer.prior={tmp_path}"])


def test_keys_unchanged_at_defaults_and_different_when_set(tiny_cfg):
    base = _with(tiny_cfg, regularizer={"form": "weighted_l2"})
    spec = stages.stage_key("target", base)[1]
    assert not {"strength", "sign", "phi_control", "prior_seed"} & set(spec["regularizer"])
    explicit = _with(base, regularizer={"strength": None, "sign": "learned", "phi_control": "none"})
    assert stages.stage_key("target", explicit)[0] == stages.stage_key("target", base)[0]
    # strength 1 is phi_META as learned: a sweep's best trial at 1 is the paper's row's stage
    assert stages.stage_key("target", _with(base, regularizer={"strength": 1.0}))[0] == \
        stages.stage_key("target", base)[0]
    variants = [{"strength": 1e6}, {"strength": 1e7}, {"sign": "positive"},
                {"phi_control": "permuted"}, {"phi_control": "uniform"},
                {"phi_control": "other_seed"}, {"phi_control": "other_seed", "prior_seed": 4}]
    keys = {stages.stage_key("target", base)[0]}
    for v in variants:
        cfg = _with(base, regularizer=v)
        keys.add(stages.stage_key("target", cfg)[0])
        for stage in ("teacher", "student", "kd"):  # upstream of the target: untouched
            assert stages.stage_key(stage, cfg)[0] == stages.stage_key(stage, base)[0]
    assert len(keys) == len(variants) + 1
    # the meta stage of the run's own seed is not moved by how a target applies its phi
    assert stages.stage_key("meta", _with(base, regularizer={"sign": "positive",
                                                             "strength": 3.0}))[0] == \
        stages.stage_key("meta", base)[0]
    # a form without phi ignores them, as it ignores calibrate_d
    l2 = _with(tiny_cfg, regularizer={"form": "l2"})
    assert stages.stage_key("target", _with(l2, regularizer={"strength": 5.0, "sign": "positive"}))[0] \
        == stages.stage_key("target", l2)[0]


def test_other_seed_plans_the_other_seeds_chain(tiny_cfg):
    base = _with(tiny_cfg, regularizer={"form": "weighted_l2", "phi_control": "other_seed"},
                 run={"seed": 2})
    nodes = stages.plan("target", base)
    assert [n.stage for n in nodes] == ["teacher", "student", "meta", "target"]
    assert [n.cfg.run.seed for n in nodes] == [1, 1, 1, 2]  # default: the previous seed
    own = stages.plan("meta", _with(base, run={"seed": 1},
                                    regularizer={"phi_control": "none"}))
    assert [n.key for n in nodes[:3]] == [n.key for n in own]  # seed 1's own meta stage
    assert nodes[-1].inputs == {"meta": own[-1].key}
    assert nodes[-1].spec["regularizer"]["prior_seed"] == 1 and nodes[-1].spec["seed"] == 2
    # seed 0 takes seed 1; an explicit prior_seed is used as given
    assert prior_seed(_with(base, run={"seed": 0})) == 1
    far = stages.plan("target", _with(base, regularizer={"prior_seed": 7}))
    assert {n.cfg.run.seed for n in far[:3]} == {7}
    with pytest.raises(UserError, match="run's own seed"):
        stages.plan("target", _with(base, regularizer={"prior_seed": 2}))
    # the plan of an ablation: the other seed's stages are the ones its own cells need
    mine = stages.plan("target", _with(base, regularizer={"phi_control": "none"}, run={"seed": 1}))
    assert {n.id for n in nodes[:3]} == {n.id for n in mine[:3]}


# ------------------------------------------------------------------ on a trained tiny chain

@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny config and its meta stage (one epoch per stage, 48 px as at the cpu preset, ~100 samples)."""
    tmp = tmp_path_factory.mktemp("controls")
    cfg = config.load("smoke", [
        "data.source.num=120", "data.target.num=120", "optim.batch_size=16",
        "data.source.size=48", "data.target.size=48", "epochs.teacher=1", "epochs.student=1",
        "epochs.meta=1", "epochs.target=1", "run.threads=1", f"data.root={tmp / 'data'}",
        f"run.store={tmp / 'runs'}", "run.progress=none"])
    return cfg, stages.run_stage("meta", cfg)


def _d_after_one_step(cfg, meta, **reg) -> float:
    """median |D| the target's own diagnostics measure after one Adam step from init (K = 100
    steps)."""
    from cmkg import diagnostics

    cfg = _with(cfg, regularizer=reg)
    node = stages.plan("target", cfg)[-1]
    cpu = torch.device("cpu")
    run = stages.build_stage("target", cfg, node.spec, {"meta": meta}, cpu)
    batch = diagnostics.fixed_batch(run.train_set, cfg.optim.batch_size, cpu)
    run.loss_fn(batch)["loss"].backward()
    run.optimizers[0].step()
    return run.diagnose(100)["prior_strength"]["overall"]["abs_d_median"]


def test_strength_scales_the_realised_d_linearly(chain):
    """D of strength s is s times D of phi_META, measured by the stage's own diagnostics on the
    applied phi (while R's gradient is small next to the data's, as here)."""
    cfg, meta = chain
    one = _d_after_one_step(cfg, meta)
    assert one > 0
    for s in (10.0, 1000.0):
        assert _d_after_one_step(cfg, meta, strength=s) == pytest.approx(s * one, rel=1e-3)
    positive = _d_after_one_step(cfg, meta, strength=1000.0, sign="positive")
    assert 0 < positive < 1000.0 * one  # a part of phi (the negative entries) is now 0


def test_d_under_a_cosine_schedule_sums_its_rates(chain):
    """lr x K of D is the sum of the rates over the run: under optim.schedule cosine (0 at the
    end of the run) D is not measured at the last step's rate but at the run's."""
    from cmkg import diagnostics
    from cmkg.train import cosine_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched, rates = cosine_schedule(opt, 100), []
    for _ in range(100):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert diagnostics.schedule_lr_sum(1e-3, 100, "cosine") == pytest.approx(sum(rates), rel=1e-9)
    assert diagnostics.schedule_lr_sum(1e-3, 100, "cosine") == pytest.approx(1e-3 * 101 / 2)
    assert opt.param_groups[0]["lr"] < 1e-9  # the rate at the end of the run
    cfg, meta = chain
    constant = _d_after_one_step(_with(cfg, optim={"schedule": "constant"}), meta, strength=10.0)
    cosine = _d_after_one_step(_with(cfg, optim={"schedule": "cosine"}), meta, strength=10.0)
    assert cosine == pytest.approx(constant * 101 / 200, rel=1e-3)


def test_the_applied_phi_is_what_the_stage_records(chain):
    """phi_applied (Fig. 5's histogram) and D describe the phi after strength, sign and
    control: permuting keeps the histogram, the positive part has no negative entries."""
    cfg, meta = chain
    learned = stages.run_stage("target", _with(cfg, regularizer={"strength": 1e3}))
    permuted = stages.run_stage("target", _with(cfg, regularizer={"strength": 1e3,
                                                                  "phi_control": "permuted"}))
    positive = stages.run_stage("target", _with(cfg, regularizer={"strength": 1e3,
                                                                  "sign": "positive"}))
    uniform = stages.run_stage("target", _with(cfg, regularizer={"strength": 1e3,
                                                                 "phi_control": "uniform"}))
    assert len({a.key for a in (learned, permuted, positive, uniform)}) == 4
    assert {a.meta["inputs"]["meta"]["key"] for a in (learned, permuted, uniform)} == {meta.key}
    la, pa = learned.metrics["phi_applied"], permuted.metrics["phi_applied"]
    assert pa["hist"] == la["hist"] and pa["fraction_negative"] == la["fraction_negative"] > 0.05
    assert positive.metrics["phi_applied"]["fraction_negative"] == 0.0
    counts = uniform.metrics["phi_applied"]["hist"]["counts"]
    assert sum(c > 0 for c in counts) == 1  # one value
    d = {n: a.metrics["prior_strength"]["overall"] for n, a in
         (("learned", learned), ("positive", positive))}
    assert d["positive"]["frac_d_negative"] == 0.0 < d["learned"]["frac_d_negative"]
    assert learned.metrics["history"][-1]["diagnostics"]["prior_strength"]["overall"] == \
        d["learned"]  # the realised D after the last epoch, in the stage's metrics


# ------------------------------------------------------------------ rows at another row's choice

STRENGTHS = [10.0, 1000.0]


def _follow_table(tmp_path, control_choose=None, **top):
    import yaml

    data = {"table": "table2", "seeds": 2,
            "columns": {"target": {"stage": "target", "metrics": ["epe_mm"]}},
            "rows": [{"label": "none", "set": {"regularizer.form": "none"}},
                     {"label": "learned", "set": {"regularizer.form": "weighted_l2"},
                      "choose": {"key": "regularizer.strength", "values": STRENGTHS}},
                     {"label": "permuted", "set": {"regularizer.form": "weighted_l2",
                                                   "regularizer.phi_control": "permuted"},
                      "choose": control_choose or {"follow": "learned"}}], **top}
    path = tmp_path / "table2.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class _Done:
    """A finished stage as ``choose`` reads it: the learned row's val prefers strength 1000,
    the permuted row's own val prefers 10 (so following is seen to override it)."""

    def __init__(self, cell):
        val = {("learned", 10.0): 20.0, ("learned", 1000.0): 10.0,
               ("permuted", 10.0): 5.0, ("permuted", 1000.0): 30.0}.get(
            (cell.row, cell.candidate), 15.0)
        self.metrics = {"best_val_epe_mm": val + cell.seed, "test": {"epe_mm": val}}


def test_a_following_row_takes_the_value_its_leader_chose(tmp_path):
    from cmkg import ablation
    from cmkg.ablation import cells as cells_mod

    ab = ablation.load(_follow_table(tmp_path))
    assert ab.row("permuted").choose == {"key": "regularizer.strength", "values": STRENGTHS,
                                         "follow": "learned"}
    cells = ablation.expand(ab, "smoke", [f"data.root={tmp_path}"])
    # no choice seeds: the follower runs every value on the report seeds, like its leader
    assert sorted((c.candidate, c.seed) for c in cells if c.row == "permuted") == \
        [(10.0, 0), (10.0, 1), (1000.0, 0), (1000.0, 1)]
    done = {c.node.id: _Done(c) for c in cells}
    kept, notes, chosen = cells_mod.choose(ab, cells, done)
    assert {c.candidate for c in kept if c.row == "learned"} == {1000.0}
    assert {c.candidate for c in kept if c.row == "permuted"} == {1000.0}  # not its own 10
    assert len([c for c in kept if c.row == "permuted"]) == 2
    follow = chosen[("permuted", "target")]
    assert follow["value"] == 1000.0 and follow["follows"] == "learned"
    assert follow["own_val_epe_mm"] == {"10": 5.5, "1000": 30.5}
    assert any("the value 'learned' chose on val" in n for n in notes)


def test_a_following_row_waits_for_the_choice_seeds(tmp_path):
    from cmkg import ablation
    from cmkg.ablation import cells as cells_mod

    ab = ablation.load(_follow_table(tmp_path, choice_seeds=2))
    cells = ablation.expand(ab, "smoke", [f"data.root={tmp_path}"])
    # the follower does not vote: no cells of its own on the choice seeds
    assert not [c for c in cells if c.row == "permuted" and c.choosing]
    first = cells_mod.first_round(ab, cells)
    assert not [c for c in first if c.row == "permuted"]
    done = {c.node.id: _Done(c) for c in first}
    decided = cells_mod.decisions(ab, cells, done)
    assert decided[("permuted", "target")] == decided[("learned", "target")] == 1000.0
    todo = [c for c in cells_mod.needed(ab, cells, decided) if c.node.id not in done]
    assert {(c.row, c.candidate) for c in todo} == {("learned", 1000.0), ("permuted", 1000.0)}
    assert {c.seed for c in todo} == {2, 3}  # the report seeds
    done.update({c.node.id: _Done(c) for c in todo})
    kept, _, chosen = cells_mod.choose(ab, cells, done)
    assert {(c.candidate, c.seed) for c in kept if c.row == "permuted"} == {(1000.0, 2),
                                                                           (1000.0, 3)}
    assert chosen[("permuted", "target")]["follows"] == "learned"


@pytest.mark.parametrize("control_choose, message", [
    ({"follow": "nobody"}, "'nobody' is not another row's label"),
    ({"follow": "permuted"}, "is not another row's label"),
    ({"follow": "none"}, "has no choose of its own"),
    ({"follow": "learned", "values": [1.0, 2.0]}, "choose.values must be row 'learned'"),
    ({"follow": "learned", "vals": [1.0]}, "vals"),
])
def test_bad_follow_entries_name_the_row(tmp_path, control_choose, message):
    from cmkg import ablation

    with pytest.raises(ConfigError, match="permuted|vals") as e:
        ablation.load(_follow_table(tmp_path, control_choose))
    assert message in str(e.value)
