"""phi from sources other than Algorithm 1 (``regularizer.phi_source``: the hindsight oracle
from the seed's unregularised target run, and the source kd student's weights), their keys
and plans, and the meta stage's per-epoch record of phi's convergence
(docs/prior-strength.md, "φ sources")."""

import dataclasses

import pytest
import torch

from cmkg import config, diagnostics, regularizers, stages
from cmkg.config import ConfigError


def _with(cfg, **sections):
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)
                                       for name, fields in sections.items()})


# ------------------------------------------------------------------ phi = 1 / (theta*^2 + eps)

def test_inverse_square_is_the_generalised_ridge_prior_scaled_to_mean_one():
    gen = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(4, 3, 3, 3, generator=gen) * 0.1,
               "b": torch.randn(5, 4, generator=gen) * 2.0}
    reg = regularizers.inverse_square(weights, eps=0.1)
    assert reg.form == "weighted_l2" and not any(r.requires_grad for r in reg.raw)
    phis = reg.phi()
    flat = torch.cat([p.flatten() for p in phis]).double()
    assert float(flat.mean()) == pytest.approx(1.0, rel=1e-6)  # strength = the mean phi
    raw = [1.0 / (w.double() ** 2 + 0.1 * float((w.double() ** 2).mean())) for w in weights.values()]
    scale = float(torch.cat([r.flatten() for r in raw]).mean())
    for p, r in zip(phis, raw):
        assert torch.allclose(p.double(), r / scale, rtol=1e-5)
    # within a tensor a smaller weight gets a larger phi; eps bounds phi at a zero weight
    a, pa = weights["a"].flatten(), phis[0].flatten()
    assert pa[a.abs().argmin()] == pa.max() and pa[a.abs().argmax()] == pa.min()
    # applied on top: strength scales it, uniform is an l2 of sigma = strength
    uni = regularizers.applied(reg, strength=0.3, control="uniform")
    assert torch.allclose(torch.cat([p.flatten() for p in uni.phi()]),
                          torch.full((flat.numel(),), 0.3), rtol=1e-5)


# ------------------------------------------------------------------ config and keys

@pytest.mark.parametrize("sets, key", [
    (["regularizer.phi_source=hindsight"], "regularizer.phi_source"),
    (["regularizer.phi_source=oracle", "regularizer.form=l2"], "regularizer.phi_source"),
    (["regularizer.phi_source=oracle", "regularizer.form=weighted_l1"], "regularizer.phi_source"),
    (["regularizer.phi_source=source_weights", "regularizer.sign=positive"], "regularizer.sign"),
    (["regularizer.phi_eps=0"], "regularizer.phi_eps"),
])
def test_bad_phi_source_entries_name_their_key(sets, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load("smoke", sets)


def test_keys_unchanged_at_meta_and_each_source_reads_its_stage(tiny_cfg):
    base = _with(tiny_cfg, regularizer={"form": "weighted_l2"})
    key = stages.stage_key("target", base)[0]
    spec = stages.stage_key("target", base)[1]
    assert not {"phi_source", "phi_eps"} & set(spec["regularizer"])
    # phi_eps is read by the weights sources only: at meta it moves no key
    assert stages.stage_key("target", _with(base, regularizer={"phi_eps": 0.5}))[0] == key
    none = stages.plan("target", _with(tiny_cfg, regularizer={"form": "none"}))
    kd = stages.plan("kd", tiny_cfg)

    oracle = stages.plan("target", _with(base, regularizer={"phi_source": "oracle",
                                                            "strength": 0.3}))
    assert [n.stage for n in oracle] == ["target", "target"]  # no source stage at all
    assert oracle[0].key == none[-1].key  # theta*: the seed's own unregularised target run
    assert oracle[-1].inputs == {"target": none[-1].key}
    assert oracle[-1].spec["regularizer"]["phi_source"] == "oracle"

    weights = stages.plan("target", _with(base, regularizer={"phi_source": "source_weights"}))
    assert [n.stage for n in weights] == ["teacher", "student", "kd", "target"]
    assert weights[-1].inputs == {"kd": kd[-1].key}

    keys = {key, oracle[-1].key, weights[-1].key,
            stages.stage_key("target", _with(base, regularizer={"phi_source": "oracle",
                                                                "strength": 0.3,
                                                                "phi_eps": 0.01}))[0],
            stages.stage_key("target", _with(base, regularizer={"phi_source": "oracle",
                                                                "strength": 0.3,
                                                                "phi_control": "permuted"}))[0]}
    assert len(keys) == 5


def test_other_seed_takes_the_other_seeds_reference_run(tiny_cfg):
    cfg = _with(tiny_cfg, regularizer={"form": "weighted_l2", "phi_source": "oracle",
                                       "phi_control": "other_seed"}, run={"seed": 2})
    nodes = stages.plan("target", cfg)
    other = stages.plan("target", _with(tiny_cfg, regularizer={"form": "none"}, run={"seed": 1}))
    assert [n.cfg.run.seed for n in nodes] == [1, 2]
    assert nodes[-1].inputs == {"target": other[-1].key}


# ------------------------------------------------------------------ trained on a tiny chain

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sources")
    return config.load("smoke", [
        "data.source.num=120", "data.target.num=120", "optim.batch_size=16",
        "data.source.size=32", "data.target.size=32", "epochs.teacher=1", "epochs.student=1",
        "epochs.kd=1", "epochs.meta=2", "epochs.target=1", "run.threads=1",
        "regularizer.form=weighted_l2", f"data.root={tmp / 'data'}",
        f"run.store={tmp / 'runs'}", "run.progress=none"])


def test_the_oracle_and_source_weights_train_with_their_phi(tiny):
    oracle = stages.run_stage("target", _with(tiny, regularizer={"phi_source": "oracle",
                                                                 "strength": 0.3}))
    none = stages.run_stage("target", _with(tiny, regularizer={"form": "none"}))  # cached
    assert oracle.meta["inputs"] == {"target": {"key": none.key, "path": str(none.path)}}
    applied = oracle.metrics["phi_applied"]
    assert applied["fraction_negative"] == 0.0
    hist = applied["hist"]
    assert sum(hist["counts"]) > 0
    d = oracle.metrics["prior_strength"]["overall"]
    assert d["abs_d_median"] > 0 and d["frac_d_negative"] == 0.0
    # the phi it trained with is 0.3 x 1/(theta*^2 + eps) of the none run's weights
    model = stages.run_stage("target", _with(tiny, regularizer={"form": "none"})).load_model()
    names = regularizers.regularised_names(model)
    want = regularizers.inverse_square({n: model.state_dict()[n] for n in names}, eps=0.1)
    node = stages.plan("target", _with(tiny, regularizer={"phi_source": "oracle",
                                                          "strength": 0.3}))[-1]
    run = stages.build_stage("target", node.cfg, node.spec, {"target": none},
                             torch.device("cpu"))
    for got, p in zip(run.regularizer.phi(), want.phi()):
        assert torch.allclose(got, 0.3 * p, rtol=1e-6)

    weights = stages.run_stage("target", _with(tiny, regularizer={"phi_source": "source_weights",
                                                                  "strength": 0.3}))
    kd = stages.run_stage("kd", tiny)  # cached
    assert weights.meta["inputs"] == {"kd": {"key": kd.key, "path": str(kd.path)}}
    assert weights.metrics["prior_strength"]["overall"]["abs_d_median"] > 0


def test_meta_records_phis_convergence_per_epoch(tiny):
    meta = stages.run_stage("meta", _with(tiny, meta={"phi_optimizer": "adam", "beta": 1e-3}))
    conv = [h["diagnostics"]["phi_convergence"] for h in meta.metrics["history"]]
    assert len(conv) == 2
    assert conv[0]["relative_change"] == pytest.approx(1.0)  # from phi_0 = 0: all of it
    assert 0 < conv[1]["relative_change"] < 1 and conv[1]["phi_norm"] > conv[0]["phi_norm"] > 0
    assert all(h["train"]["phi_grad_norm"] > 0 for h in meta.metrics["history"])


def test_phi_convergence_measures_from_the_epochs_first_step():
    reg = regularizers.Regularizer("weighted_l2", {"w": torch.Size([4])}, phi_init=0.0)
    conv = diagnostics.PhiConvergence(reg)
    with torch.no_grad():
        reg.raw[0].copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # phi when the epoch starts
    conv.started()
    with torch.no_grad():
        reg.raw[0].copy_(torch.tensor([1.0, 1.0, 0.0, 0.0]))
    conv.started()  # later steps of the same epoch keep the first snapshot
    with torch.no_grad():
        reg.raw[0].copy_(torch.tensor([3.0, 4.0, 0.0, 0.0]))
    out = conv()["phi_convergence"]
    assert out["phi_norm"] == pytest.approx(5.0)
    assert out["relative_change"] == pytest.approx((2.0 ** 2 + 4.0 ** 2) ** 0.5 / 5.0)
    assert out["mean_abs"] == pytest.approx(7.0 / 4)
    conv.started()  # the next epoch starts from the phi the last one ended with
    assert conv()["phi_convergence"]["relative_change"] == 0.0
