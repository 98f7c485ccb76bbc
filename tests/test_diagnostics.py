"""Loss reductions as a config choice, and the diagnostics of ``cmkg.diagnostics`` against hand
computations: gradient shares, Adam's RMS, the prior's figure D, phi's per-layer statistics."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cmkg import config, diagnostics, losses, models, regularizers, stages
from cmkg.errors import ConfigError
from cmkg.meta import objective_g, unroll
from cmkg.train import FitState

# ---------------------------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------------------------


def test_reductions_scale_the_losses_by_the_element_counts():
    torch.manual_seed(0)
    pred, target = torch.randn(5, 21, 3), torch.randn(5, 21, 3)
    reg_sum = losses.regression_loss(pred, target, "sum")
    assert float(losses.regression_loss(pred, target)) == float(reg_sum)  # the default
    torch.testing.assert_close(losses.regression_loss(pred, target, "mean"), reg_sum / 63)
    torch.testing.assert_close(losses.regression_loss(pred, target, "mean"),
                               nn.functional.mse_loss(pred, target))

    s, t = torch.randn(4, 6, 3, 5), torch.randn(4, 6, 3, 5)  # (B, C, H, W)
    act_mean = losses.activation_loss(s, t)
    torch.testing.assert_close(losses.activation_loss(s, t, "sum"), act_mean * 6 * 3 * 5)

    s2, t2 = torch.randn(4, 8, 2, 2), torch.randn(4, 8, 2, 2)  # a second pair, 4 positions
    att_mean = [losses.attention_loss([a], [b]) for a, b in ((s, t), (s2, t2))]
    torch.testing.assert_close(losses.attention_loss([s], [t], "sum"), att_mean[0] * 15)
    torch.testing.assert_close(losses.attention_loss([s, s2], [t, t2], "sum"),
                               att_mean[0] * 15 + att_mean[1] * 4)

    parts = losses.distillation_loss(s, t, [s, s2], [t, t2], lambda_att=10.0,
                                     reduction={"act": "sum", "att": "sum"})
    torch.testing.assert_close(parts["act"], act_mean * 90)
    torch.testing.assert_close(parts["dist"], act_mean * 90 + 10.0 * (att_mean[0] * 15
                                                                      + att_mean[1] * 4))
    default = losses.distillation_loss(s, t, [s], [t], lambda_att=10.0)
    assert float(default["act"]) == float(act_mean)
    with pytest.raises(ValueError, match="att reduction must be one of mean, sum"):
        losses.attention_loss([s], [t], "none")
    with pytest.raises(ValueError, match="reg reduction"):
        losses.reductions({"reg": "avg"})


class _Net(nn.Module):
    """(B, 2, 4, 4) -> joints (B, 21, 3) and two activation maps."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(64, 63)

    def forward(self, x):
        a1 = torch.tanh(self.c1(x))
        a2 = torch.tanh(self.c2(a1))
        return self.head(a2.flatten(1)).view(-1, 21, 3), [a1, a2]


def test_meta_objective_and_inner_step_follow_the_reductions():
    torch.manual_seed(0)
    net, teacher = _Net(), _Net()
    x, y = torch.randn(3, 2, 4, 4), torch.randn(3, 21, 3)
    with torch.no_grad():
        _, t_acts = teacher(x)
    params = dict(net.named_parameters())
    kw = {"losses": ["act", "att"], "lambda_att": 5.0, "att_layers": [1, 2]}
    base = objective_g(net, nn.Identity(), params, {}, x, y, t_acts, **kw)
    lit = objective_g(net, nn.Identity(), params, {}, x, y, t_acts, **kw,
                      reduction={"reg": "mean", "act": "sum", "att": "sum"})
    torch.testing.assert_close(lit["reg"], base["reg"] / 63)
    torch.testing.assert_close(lit["act"], base["act"] * 4 * 16)  # C * H * W of the last map
    torch.testing.assert_close(lit["att"], base["att"] * 16)  # 16 positions in both layers
    torch.testing.assert_close(lit["G"], lit["reg"] + lit["act"] + 5.0 * lit["att"])

    # the inner step of Algorithm 1 descends L_REG with the chosen reduction
    reg = regularizers.build("weighted_l2", net)
    theta0 = {n: p.detach().requires_grad_() for n, p in params.items()}
    out = unroll(net, reg, theta0, {}, x, y, alpha=0.1, steps=1, reduction={"reg": "mean"})
    g = torch.autograd.grad(losses.regression_loss(net(x)[0], y, "mean"), list(params.values()))
    for (n, p), gn in zip(params.items(), g):
        torch.testing.assert_close(out[n], p - 0.1 * gn)  # phi = 0: R adds nothing


def test_reduction_config_is_strict_with_dotted_keys(tmp_path):
    cfg = config.load("smoke")
    assert dataclasses.asdict(cfg.reduction) == losses.DEFAULT_REDUCTION == {
        "reg": "sum", "act": "mean", "att": "mean"}
    assert config.load("smoke", ["reduction.reg=mean"]).reduction.reg == "mean"
    with pytest.raises(ConfigError) as e:
        config.load("smoke", ["reduction.reg=avg", "reduction.act=none", "reduction.atx=sum"])
    msg = str(e.value)
    assert "reduction.reg: must be sum or mean, got 'avg'" in msg
    assert "reduction.act: must be mean or sum, got 'none'" in msg
    assert "reduction.atx: unknown key (did you mean 'att'?)" in msg


# the keys of the smoke preset's stages computed before reductions became a choice (with the
# smoke preset of then, tests/data/smoke-v1.yaml): cached artifacts of default runs must stay
# valid
SMOKE_V1 = str(Path(__file__).resolve().parent / "data" / "smoke-v1.yaml")
PINNED = {
    "weighted_l2": {
        "teacher": "d6a4a54b69f5add00a511a6487a2f81541139961980263e91c8a58483c906a35",
        "student": "10d6e90273812aad0b6f0977e81c42f499d8ccc0bf3c17821fc65f6be3f451c9",
        "kd": "71fa59300aa34410970942c408a54919aac06acae0ab9fa8d64cc699540e7f17",
        "meta": "2fa9a49758b827594dddafbefa3cf876099bf8066fed7f5ac8a9b73be983fd1f",
        "target": "9766aa99a2f81967f2506a80cdaf4306bb35f8618470155b10f456ef77be4368"},
    "l2": {
        "meta": "fb4af57c1528356962a0b44da2476c7c8c537ce114494803a4093bb1f10b494b",
        "target": "c2d36f30ff206ba9b98505672f50c8eb882f10e2e6b739fd8e06e13bfa479b32"},
}


@pytest.mark.parametrize("form", ["weighted_l2", "l2"])
def test_default_reductions_leave_every_stage_key_unchanged(form):
    cfg = config.load(SMOKE_V1, [f"regularizer.form={form}"])
    for stage, key in PINNED[form].items():
        got, spec, _ = stages.stage_key(stage, cfg)
        assert got == key, f"{stage}: key moved"
        assert "reduction" not in spec


def test_a_reduction_enters_the_keys_of_the_stages_that_use_its_term():
    base = config.load("smoke", ["regularizer.form=l2"])
    keys = {s: stages.stage_key(s, base)[0] for s in stages.STAGES}
    for term, users in (("reg", set(stages.STAGES)), ("act", {"kd", "meta"}),
                        ("att", {"kd", "meta"})):
        cfg = dataclasses.replace(base, reduction=dataclasses.replace(
            base.reduction, **{term: "sum" if term != "reg" else "mean"}))
        moved = {s for s in stages.STAGES if stages.stage_key(s, cfg)[0] != keys[s]}
        assert moved == users, term
        spec = stages.stage_key("kd", cfg)[1]
        assert spec["reduction"] == dataclasses.asdict(cfg.reduction)


# ---------------------------------------------------------------------------------------------
# Gradient shares and the prior's figure D, by hand on a 2-layer linear net
# ---------------------------------------------------------------------------------------------

def _linear_setup(form):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False)).double()
    batch = {"x": torch.randn(5, 3, dtype=torch.float64), "y": torch.randn(5, 2, dtype=torch.float64)}
    reg = regularizers.build(form, net, sigma=0.3).double()
    with torch.no_grad():
        for r in reg.raw:
            r.copy_(torch.randn_like(r) * 0.5)  # phi of both signs

    def loss_fn(b):
        reg_loss = (net(b["x"]) - b["y"]).pow(2).sum(1).mean()
        prior = reg(dict(net.named_parameters()))
        return {"loss": reg_loss + prior, "reg": reg_loss, "prior": prior}

    return net, reg, batch, loss_fn


def _hand_grads(net, reg, batch):
    """Closed-form grad L_REG and grad R of L = mean_b ||W2 W1 x_b - y_b||^2, R = phi theta^2."""
    w1, w2 = net[0].weight.detach(), net[1].weight.detach()
    x, y = batch["x"], batch["y"]
    h = x @ w1.T  # (B, 4)
    r = 2 * (h @ w2.T - y) / len(x)  # dL/df, (B, 2)
    g_reg = [w2.T @ r.T @ x, r.T @ h]  # dL/dW1 (4, 3), dL/dW2 (2, 4)
    phis = reg.phi() if reg.weighted else [torch.full_like(w1, reg.sigma),
                                           torch.full_like(w2, reg.sigma)]
    g_prior = [2 * p.detach() * w for p, w in zip(phis, (w1, w2))]
    return g_reg, g_prior, [p.detach() for p in phis]


def _norm(ts):
    return float(torch.sqrt(sum(t.pow(2).sum() for t in ts)))


@pytest.mark.parametrize("form", ["weighted_l2", "l2"])
def test_target_diagnostics_match_a_hand_computation(form):
    net, reg, batch, loss_fn = _linear_setup(form)
    lr, betas, eps, total_steps = 1e-2, (0.9, 0.99), 1e-8, 40
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=betas, eps=eps)
    hook = diagnostics.target_diagnose(loss_fn, batch, net, reg, opt)
    assert hook(total_steps)["prior_strength"] == {}  # no Adam state yet: no D
    full = []  # grad F at each step, for Adam's second moment
    for _ in range(2):
        g_reg, g_prior, _ = _hand_grads(net, reg, batch)
        full.append([a + b for a, b in zip(g_reg, g_prior)])
        opt.zero_grad()
        loss_fn(batch)["loss"].backward()
        for p, g in zip(net.parameters(), full[-1]):
            torch.testing.assert_close(p.grad, g)
        opt.step()

    out = hook(total_steps)
    g_reg, g_prior, phis = _hand_grads(net, reg, batch)
    total = [a + b for a, b in zip(g_reg, g_prior)]
    assert out["grad_share"]["reg"] == pytest.approx(_norm(g_reg) / _norm(total), rel=1e-9)
    assert out["grad_share"]["prior"] == pytest.approx(_norm(g_prior) / _norm(total), rel=1e-9)

    # s = sqrt(v / (1 - beta2^2)) + eps, v = beta2 (1 - beta2) g0^2 + (1 - beta2) g1^2
    b2 = betas[1]
    ds = []
    for g0, g1, phi in zip(full[0], full[1], phis):
        s = torch.sqrt((b2 * (1 - b2) * g0 ** 2 + (1 - b2) * g1 ** 2) / (1 - b2 ** 2)) + eps
        ds.append((lr * total_steps * 2 * phi / s).flatten().numpy())  # weighted l2: 2 phi / s
    strength = out["prior_strength"]
    assert strength["lr"] == lr and strength["total_steps"] == total_steps
    for name, d, gr, gp in zip(reg.names, ds, g_reg, g_prior):
        layer = strength["layers"][name]
        assert layer["abs_d_median"] == pytest.approx(np.median(np.abs(d)), rel=1e-9)
        assert layer["abs_d_p90"] == pytest.approx(np.percentile(np.abs(d), 90), rel=1e-9)
        assert layer["frac_abs_d_gt_0.1"] == pytest.approx((np.abs(d) > 0.1).mean())
        assert layer["frac_d_negative"] == pytest.approx((d < 0).mean())
        assert layer["grad_ratio"] == pytest.approx(_norm([gp]) / _norm([gr]), rel=1e-9)
    every = np.concatenate(ds)
    overall = strength["overall"]
    assert overall["abs_d_median"] == pytest.approx(np.median(np.abs(every)), rel=1e-9)
    assert overall["frac_d_negative"] == pytest.approx((every < 0).mean())
    assert overall["grad_ratio"] == pytest.approx(_norm(g_prior) / _norm(g_reg), rel=1e-9)
    if form == "l2":  # a constant prior decays every weight
        assert overall["frac_d_negative"] == 0.0
    else:
        assert 0.0 < overall["frac_d_negative"] < 1.0
    assert 0.0 < overall["frac_abs_d_gt_0.1"] <= 1.0


def test_strength_of_l1_is_phi_over_s_abs_theta_and_zero_at_zero():
    theta = torch.tensor([0.5, -2.0, 0.0])
    s = torch.tensor([0.1, 0.2, 0.3])
    phi = torch.tensor([1e-3, 1e-3, 1e-3])
    d = diagnostics.strength(phi * torch.sign(theta), theta, s, lr=0.1, total_steps=100)
    torch.testing.assert_close(d, torch.tensor([10 * 1e-3 / (0.1 * 0.5),
                                                10 * 1e-3 / (0.2 * 2.0), 0.0],
                                               dtype=torch.float64))


def test_strength_of_a_tiny_float32_weight_is_finite():
    # an l2's D is lr K 2 sigma / s whatever theta is; in float32, theta^2 of 1e-23 is 0 and
    # 0 / 0 made it nan (a committed run's seed logged a nan median |D| that way)
    theta = torch.tensor([1e-23, 0.5], dtype=torch.float32)
    s = torch.tensor([0.1, 0.1], dtype=torch.float32)
    d = diagnostics.strength(2 * 1e-5 * theta, theta, s, lr=0.1, total_steps=100)
    torch.testing.assert_close(d, torch.full((2,), 10 * 2e-5 / 0.1, dtype=torch.float64))
    assert diagnostics.summarize(d)["abs_d_median"] == pytest.approx(10 * 2e-5 / 0.1)


def _posenets():
    torch.manual_seed(0)
    student, teacher = models.build("resnet10", "rgb"), models.build("resnet10", "depth").eval()
    batch = {"rgb": torch.randn(4, 3, 32, 32), "depth": torch.randn(4, 1, 32, 32),
             "target": torch.randn(4, 21, 3)}
    return student, teacher, batch


def test_kd_and_meta_shares_by_hand_and_without_trace():
    from cmkg.train import distillation_objective

    student, teacher, batch = _posenets()
    kw = {"losses": ["act", "att"], "lambda_att": 1e3, "att_layers": [1, 2, 3, 4]}
    buffers = {n: b.clone() for n, b in student.named_buffers()}
    meta = diagnostics.meta_diagnose(student, nn.Identity(), teacher, batch, **kw)(10)
    kd = diagnostics.distill_diagnose(
        distillation_objective(models.StudentWithAdapter(student, nn.Identity()), teacher, **kw),
        batch, student, kw["lambda_att"])(10)
    assert all(torch.equal(b, buffers[n]) for n, b in student.named_buffers())  # BN untouched
    assert set(meta["grad_share"]) == {"reg", "act", "att"}

    # by hand: the three summands of G on the backbone (stem and layer1..4, not the head)
    pred, acts = student(batch["rgb"])
    with torch.no_grad():
        _, t_acts = teacher(batch["depth"])
    terms = {"reg": losses.regression_loss(pred, batch["target"]),
             "act": losses.activation_loss(acts[-1], t_acts[-1]),
             "att": 1e3 * losses.attention_loss(acts, t_acts)}
    backbone = [p for n, p in student.named_parameters() if not n.startswith("head.")]
    grads = {k: torch.autograd.grad(t, backbone, retain_graph=True) for k, t in terms.items()}
    total = _norm([sum(gs) for gs in zip(*grads.values())])
    for k, gs in grads.items():
        assert meta["grad_share"][k] == pytest.approx(_norm(gs) / total, rel=1e-4)
        assert kd["grad_share"][k] == pytest.approx(meta["grad_share"][k], rel=1e-4)


def test_phi_summary_per_layer():
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    reg = regularizers.build("weighted_l2", net)
    with torch.no_grad():
        reg.raw[0].copy_(torch.arange(12.0).view(4, 3) - 3)  # -3..8: 3 negative of 12
        reg.raw[1].fill_(0.5)
    summary = stages.phi_summary(reg)
    assert summary["count"] == 20 and summary["fraction_negative"] == pytest.approx(3 / 20)
    first = summary["layers"]["0.weight"]
    values = np.arange(12.0) - 3
    assert first["mean"] == pytest.approx(values.mean())
    assert first["std"] == pytest.approx(values.std(ddof=1))
    assert first["fraction_negative"] == pytest.approx(0.25)
    for q in (1, 10, 50, 90, 99):
        assert first[f"p{q}"] == pytest.approx(np.percentile(values, q))
    assert summary["layers"]["1.weight"]["p1"] == summary["layers"]["1.weight"]["p99"] == 0.5
    assert summary["layers"]["1.weight"]["std"] == 0.0


# ---------------------------------------------------------------------------------------------
# A tiny target stage end to end
# ---------------------------------------------------------------------------------------------

def test_tiny_target_stage_logs_diagnostics_and_trains_as_without_them(tiny_cfg, capsys):
    cfg = config.load("smoke", [
        "data.target.num=120", "optim.batch_size=16", "data.target.size=32",
        "epochs.target=2", "regularizer.form=l2", "regularizer.sigma=1e-2", "run.threads=1",
        "optim.schedule=constant",  # the lr in the strength is then the set one
        f"data.root={tiny_cfg.data.root}", f"run.store={tiny_cfg.run.store}",
        "run.progress=lines"])
    art = stages.run_stage("target", cfg)
    err = capsys.readouterr().err
    assert "target   epoch   2/2  grad share reg" in err
    history = art.metrics["history"]
    assert len(history) == 2
    for record in history:
        diag = record["diagnostics"]
        assert set(diag["grad_share"]) == {"reg", "prior"}
        assert diag["grad_share"]["prior"] > 0
        strength = diag["prior_strength"]
        assert set(strength["layers"]) == set(regularizers.regularised_names(
            models.build("resnet10", "rgb")))
        assert strength["overall"]["frac_d_negative"] == 0.0  # l2 only decays
    final = art.metrics["prior_strength"]
    assert final["overall"] == history[-1]["diagnostics"]["prior_strength"]["overall"]
    assert final["lr"] == cfg.optim.lr

    # the same run without the hook trains to the same weights (diagnostics leave no trace)
    torch.set_num_threads(1)
    _, spec, _ = stages.stage_key("target", cfg)
    device = torch.device("cpu")
    run = stages.build_stage("target", cfg, spec, {}, device)
    run.diagnose = None
    gen = torch.Generator().manual_seed(cfg.run.seed)
    train_loader, val_loader, _ = stages.make_loaders(run, cfg, device, gen)
    assert final["total_steps"] == 2 * len(train_loader)  # K = epochs x steps per epoch
    state = stages.fit_stage(run, cfg, spec, train_loader, val_loader, device, FitState(),
                             lambda st: None)
    assert "diagnostics" not in state.history[-1]
    published = art.load_model().state_dict()
    assert all(torch.equal(published[k], v) for k, v in state.best_state.items())
    print(history[-1]["diagnostics"]["grad_share"], final["overall"])
