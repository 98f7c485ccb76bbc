"""The regularizer forms are rows of one table (cmkg.forms.FORMS): a form added by a row (and,
for a new penalty, one entry of regularizers.PENALTIES) is validated, keyed and computed with no
other change; the rows of the paper's forms give R and its closed-form gradient."""

import dataclasses

import pytest
import torch

from cmkg import config, forms, regularizers, stages


@pytest.fixture
def quartic(monkeypatch):
    """A toy form added the way a contributor would: one row, one penalty."""
    monkeypatch.setitem(forms.FORMS, "l4", forms.Form("l4", "quartic", weighted=False, sigma=True))
    monkeypatch.setitem(regularizers.PENALTIES, "quartic",
                        (lambda t: t.pow(4), lambda t: 4.0 * t.pow(3)))
    monkeypatch.setitem(forms.FORMS, "weighted_l4",
                        forms.Form("weighted_l4", "quartic", weighted=True, sigma=False))


def _target_key(cfg, **reg):
    cfg = dataclasses.replace(cfg, regularizer=dataclasses.replace(cfg.regularizer, **reg))
    return stages.stage_key("target", cfg)[0]


def test_a_form_added_by_its_row_is_validated_keyed_and_computed(quartic, tiny_cfg):
    cfg = config.load("smoke", ["regularizer.form=l4", "regularizer.sigma=0.1"])
    assert cfg.regularizer.form == "l4"  # validation reads the rows
    # sigma enters the key because the row says so: two sigmas, two keys (no shared artifact)
    assert _target_key(tiny_cfg, form="l4", sigma=0.1) != _target_key(tiny_cfg, form="l4", sigma=0.2)
    # a weighted row: sigma stays out of the key, and the target needs a phi (a meta stage)
    assert (_target_key(tiny_cfg, form="weighted_l4", sigma=0.1)
            == _target_key(tiny_cfg, form="weighted_l4", sigma=0.2))
    weighted = dataclasses.replace(tiny_cfg, regularizer=dataclasses.replace(
        tiny_cfg.regularizer, form="weighted_l4"))
    assert "meta" in stages.depends("target", weighted)
    reg = regularizers.Regularizer("l4", {"w": torch.Size([3, 2])}, sigma=0.1)
    w = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    value = reg({"w": w})
    assert float(value) == pytest.approx(0.1 * float((w.detach() ** 4).sum()))
    (auto,) = torch.autograd.grad(value, w)
    assert torch.allclose(reg.grad({"w": w})["w"], auto)


@pytest.mark.parametrize("form", ["none", "l1", "l2", "weighted_l1", "weighted_l2"])
def test_each_paper_form_gives_r_and_its_closed_form_gradient(form):
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": torch.Size([4, 3]), "b": torch.Size([5])}
    reg = regularizers.Regularizer(form, shapes, sigma=0.3).double()
    if reg.weighted:
        reg.set_phi([torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes.values()])
    theta = {n: torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True)
             for n, s in shapes.items()}
    value = reg(theta)
    phis = reg.phi() if reg.weighted else [torch.full(s, 0.3, dtype=torch.float64)
                                           for s in shapes.values()]
    h = {"none": lambda t: 0 * t, "l1": torch.abs, "weighted_l1": torch.abs}.get(
        form, lambda t: t ** 2)
    expected = sum((p * h(t.detach())).sum() for p, t in zip(phis, theta.values()))
    assert float(value) == pytest.approx(float(expected))
    if form == "none":
        return
    auto = torch.autograd.grad(value, list(theta.values()))
    for (name, g), a in zip(reg.grad(theta).items(), auto):
        assert torch.allclose(g, a), name
    assert forms.uses_sigma(form) == (form in ("l1", "l2"))
    assert forms.weighted(form) == form.startswith("weighted_")
