"""Algorithm 1 against mathematics: meta-gradients vs central finite differences and the closed
form, BatchNorm safety, first-order error, and Algorithm 2's equivalences with the baselines."""

import copy

import pytest
import torch
from torch import nn

from cmkg import regularizers
from cmkg.losses import regression_loss
from cmkg.meta import meta_gradient, meta_iteration, objective_g, unroll

LOSS_KW = {"losses": ["act", "att"], "lambda_att": 10.0, "att_layers": [1, 2]}


class Tiny(nn.Module):
    """A PoseNet-shaped toy: conv-BN-ReLU, conv-ReLU, linear head to 21x3; two activation maps."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.c1 = nn.Conv2d(in_ch, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6 * 4 * 4, 63)

    def forward(self, x):
        a1 = torch.relu(self.bn(self.c1(x)))
        a2 = torch.relu(self.c2(a1))
        return self.head(a2.flatten(1)).view(-1, 21, 3), [a1, a2]


def _setup(form, seed=0, phi_scale=0.5):
    torch.manual_seed(seed)
    student, teacher = Tiny(3).double(), Tiny(1).double().eval()
    batch = {"rgb": torch.randn(6, 3, 8, 8, dtype=torch.float64),
             "depth": torch.randn(6, 1, 8, 8, dtype=torch.float64),
             "target": torch.randn(6, 21, 3, dtype=torch.float64)}
    reg = regularizers.build(form, student).double()
    with torch.no_grad():
        for r in reg.raw:
            r.uniform_(0.0, phi_scale)
    with torch.no_grad():
        _, t_acts = teacher(batch["depth"])
    return student, reg, batch, t_acts


def _g_at(student, reg, batch, t_acts, alpha, steps, first_order=False):
    return meta_gradient(student, nn.Identity(), reg, batch, t_acts, alpha=alpha, steps=steps,
                         first_order=first_order, **LOSS_KW)


@pytest.mark.parametrize("form", ["weighted_l1", "weighted_l2"])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_meta_gradient_matches_central_differences(form, steps):
    alpha, eps = 0.05, 1e-5
    student, reg, batch, t_acts = _setup(form)
    grads, _ = _g_at(student, reg, batch, t_acts, alpha, steps)
    gen = torch.Generator().manual_seed(1)
    direction = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in reg.raw]

    def g_with(shift):
        shifted = copy.deepcopy(reg)
        with torch.no_grad():
            for r, d in zip(shifted.raw, direction):
                r.add_(shift * d)
        return float(_g_at(student, shifted, batch, t_acts, alpha, steps)[1])

    numeric = (g_with(eps) - g_with(-eps)) / (2 * eps)
    analytic = float(sum((g * d).sum() for g, d in zip(grads, direction)))
    assert abs(analytic) > 1e-6  # a real signal, not two zeros agreeing
    assert abs(analytic - numeric) / abs(numeric) < 1e-4
    # and element-wise on the largest entries of the head's phi
    k = reg.names.index("head.weight")
    flat = grads[k].flatten()
    for idx in flat.abs().topk(3).indices.tolist():
        def g_elem(shift, idx=idx):
            shifted = copy.deepcopy(reg)
            with torch.no_grad():
                shifted.raw[k].view(-1)[idx] += shift
            return float(_g_at(student, shifted, batch, t_acts, alpha, steps)[1])

        num = (g_elem(1e-4) - g_elem(-1e-4)) / 2e-4
        assert abs(float(flat[idx]) - num) / abs(num) < 1e-4


def test_weighted_l2_one_step_closed_form():
    """l = 1: dG(theta_1)/dphi = -2 alpha theta_0 * grad G(theta_1), element-wise."""
    alpha = 0.05
    student, reg, batch, t_acts = _setup("weighted_l2")
    grads, _ = _g_at(student, reg, batch, t_acts, alpha, 1)
    theta0 = {n: p.detach().clone() for n, p in student.named_parameters()}
    buffers = {n: b.clone() for n, b in student.named_buffers()}
    pred, _ = torch.func.functional_call(student, {**theta0, **buffers}, (batch["rgb"],))
    t0 = {n: t.requires_grad_() for n, t in theta0.items()}
    g_reg = torch.autograd.grad(regression_loss(torch.func.functional_call(
        student, {**t0, **{n: b.clone() for n, b in student.named_buffers()}},
        (batch["rgb"],))[0], batch["target"]), list(t0.values()))
    phis = dict(zip(reg.names, reg.phi()))
    theta1 = {n: (t - alpha * (g + (2 * phis[n] * t if n in phis else 0))).detach().requires_grad_()
              for (n, t), g in zip(t0.items(), g_reg)}
    g1 = objective_g(student, nn.Identity(), theta1, buffers, batch["rgb"], batch["target"],
                     t_acts, **LOSS_KW)["G"]
    grad_g1 = dict(zip(theta1, torch.autograd.grad(g1, list(theta1.values()))))
    for name, g in zip(reg.names, grads):
        torch.testing.assert_close(g, -2 * alpha * t0[name].detach() * grad_g1[name],
                                   rtol=1e-10, atol=1e-14)


def test_first_order_is_exact_for_one_step_and_close_for_more():
    alpha = 0.05
    student, reg, batch, t_acts = _setup("weighted_l2")
    exact1, _ = _g_at(student, reg, batch, t_acts, alpha, 1)
    first1, _ = _g_at(student, reg, batch, t_acts, alpha, 1, first_order=True)
    for a, b in zip(exact1, first1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # l = 3: the dropped Hessian-vector terms are O(alpha) relative to the kept ones
    errors = []
    for a in (0.05, 0.005, 2.5e-4):
        e = torch.cat([g.flatten() for g in _g_at(student, reg, batch, t_acts, a, 3)[0]])
        f = torch.cat([g.flatten() for g in _g_at(student, reg, batch, t_acts, a, 3, True)[0]])
        errors.append(float((e - f).norm() / e.norm()))
    assert errors[0] > errors[1] > errors[2] > 0
    assert errors[2] < 0.03  # at the paper's alpha = 2.5e-4


def test_unrolled_steps_leave_batchnorm_statistics_alone():
    student, reg, batch, t_acts = _setup("weighted_l2")
    before = {n: b.clone() for n, b in student.named_buffers()}
    _g_at(student, reg, batch, t_acts, 0.05, 3)
    for n, b in student.named_buffers():
        torch.testing.assert_close(b, before[n], rtol=0, atol=0)


def test_meta_iteration_updates_phi_and_theta_like_one_training_step():
    student, reg, batch, t_acts = _setup("weighted_l2")
    teacher = Tiny(1).double().eval()
    ref = copy.deepcopy(student)
    # SGD, not Adam: the biases before BatchNorm have a gradient of exactly zero up to
    # rounding (~1e-17), which Adam would scale up to a full step of either sign
    theta_opt = torch.optim.SGD(student.parameters(), lr=1e-3)
    phi_opt = torch.optim.SGD(reg.parameters(), lr=1.0)
    phi_before = [r.detach().clone() for r in reg.raw]
    parts = meta_iteration(student, nn.Identity(), teacher, reg, batch, theta_opt, phi_opt,
                           alpha=0.05, steps=2, first_order=False, **LOSS_KW)
    assert set(parts) >= {"loss", "reg", "act", "att", "G_inner", "phi_grad_norm"}
    assert any(not torch.equal(a, b) for a, b in zip(phi_before, reg.raw))
    # theta moved by the optimizer on grad G(theta_k); BN running stats as after one forward
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-3)
    with torch.no_grad():
        _, tt = teacher(batch["depth"])
    g = objective_g(ref, nn.Identity(), dict(ref.named_parameters()), {}, batch["rgb"],
                    batch["target"], tt, **LOSS_KW)["G"]
    ref_opt.zero_grad()
    g.backward()
    ref_opt.step()
    for (n, a), b in zip(student.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=n)


def _train_target(form, sigma=0.0, phi=None, steps=5):
    """Algorithm 2 on the toy: Adam on L_REG + R for a few steps from a fixed init."""
    torch.manual_seed(3)
    model = Tiny(3).double()
    reg = regularizers.build(form, model, sigma=sigma).double()
    if phi is not None:
        with torch.no_grad():
            for r in reg.raw:
                r.fill_(phi)
    reg.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(4)
    for _ in range(steps):
        x = torch.randn(6, 3, 8, 8, generator=gen, dtype=torch.float64)
        y = torch.randn(6, 21, 3, generator=gen, dtype=torch.float64)
        pred, _ = model(x)
        loss = regression_loss(pred, y) + reg(dict(model.named_parameters()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict()


def test_algorithm2_with_zero_phi_is_no_regularizer_and_constant_phi_is_l2():
    none = _train_target("none")
    zero = _train_target("weighted_l2", phi=0.0)
    for n in none:
        assert torch.equal(none[n], zero[n]), n  # numerically identical
    l2 = _train_target("l2", sigma=0.03)
    const = _train_target("weighted_l2", phi=0.03)
    differs = False
    for n in l2:
        torch.testing.assert_close(l2[n], const[n], rtol=1e-12, atol=1e-14)
        differs |= not torch.equal(l2[n], none[n])
    assert differs  # the regularizer did act


def test_unroll_without_phi_path_is_plain_sgd():
    torch.manual_seed(0)
    model = Tiny(3).double()
    reg = regularizers.build("l2", model, sigma=0.1).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.randn(4, 21, 3, dtype=torch.float64)
    theta0 = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    out = unroll(model, reg, theta0, buffers, x, y, alpha=0.1, steps=1)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    loss = regression_loss(ref(x)[0], y) + reg(dict(ref.named_parameters()))
    loss.backward()
    opt.step()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(out[n].detach(), p.detach(), rtol=1e-12, atol=1e-14)


def _toy_batches(seed, n, teacher):
    """RGB = the depth map in every channel plus heavy noise; y = the depth teacher's output, so
    the teacher's activations are exactly the features that predict y."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        depth = torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64)
        rgb = depth.expand(16, 3, 8, 8) + torch.randn(16, 3, 8, 8, generator=g, dtype=torch.float64)
        with torch.no_grad():
            target = teacher(depth)[0]
        out.append({"rgb": rgb, "depth": depth, "target": target})
    return out


def test_meta_training_lowers_g_on_held_out_batches():
    """Algorithm 1 on a toy where the privileged signal is known to help: the learned phi
    makes one inner step of F lower G on batches it never saw, against phi = 0."""
    torch.manual_seed(0)
    teacher = Tiny(1).double().eval()
    train, held = _toy_batches(1, 40, teacher), _toy_batches(2, 20, teacher)
    student = Tiny(3).double()
    reg = regularizers.build("weighted_l2", student).double()
    theta_opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    phi_opt = torch.optim.SGD(reg.parameters(), lr=100.0)  # toy scale, not the paper's beta
    for _ in range(3):
        for b in train:
            meta_iteration(student, nn.Identity(), teacher, reg, b, theta_opt, phi_opt, alpha=0.05,
                           steps=1, first_order=False, **LOSS_KW)
    zero = copy.deepcopy(reg)
    with torch.no_grad():
        for r in zero.raw:
            r.zero_()
    learned, baseline = [], []
    for b in held:
        with torch.no_grad():
            _, t_acts = teacher(b["depth"])
        learned.append(float(_g_at(student, reg, b, t_acts, 0.05, 1)[1]))
        baseline.append(float(_g_at(student, zero, b, t_acts, 0.05, 1)[1]))
    wins = sum(a < b for a, b in zip(learned, baseline))
    assert wins >= 18, (wins, learned, baseline)
    assert sum(learned) < 0.95 * sum(baseline)


def test_phi_is_clipped_and_a_nan_phi_stops_the_stage():
    from cmkg.errors import NumericalError
    from cmkg.meta import check_phi, phi_bounds

    lo, hi = phi_bounds(2.5e-4)
    assert (lo, hi) == (-2000.0, 2000.0)
    student, reg, batch, _ = _setup("weighted_l2")
    teacher = Tiny(1).double().eval()
    theta_opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    phi_opt = torch.optim.SGD(reg.parameters(), lr=1e9)  # a runaway meta step
    meta_iteration(student, nn.Identity(), teacher, reg, batch, theta_opt, phi_opt, alpha=0.05,
                   steps=1, first_order=False, phi_clip=phi_bounds(0.05), **LOSS_KW)
    flat = torch.cat([r.detach().flatten() for r in reg.raw])
    assert float(flat.min()) >= -10.0 and float(flat.max()) <= 10.0
    assert float(flat.abs().max()) == 10.0  # the clip did bind
    with torch.no_grad():
        reg.raw[0].view(-1)[0] = float("nan")
    with pytest.raises(NumericalError, match=r"stage meta: phi of c1.weight became non-finite"):
        check_phi(reg, "meta", 3)


def test_target_training_with_negative_phi_stays_finite():
    """A strongly negative, unconstrained phi (at the default clip) boosts the weights; Adam's
    bounded steps keep them finite and growing at most linearly."""
    torch.manual_seed(0)
    model = Tiny(3).double()
    reg = regularizers.build("weighted_l2", model).double()
    with torch.no_grad():
        for r in reg.raw:
            r.fill_(-2000.0)
    reg.requires_grad_(False)
    lr, steps = 1e-3, 200
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randn(6, 21, 3, dtype=torch.float64)
    for _ in range(steps):
        loss = regression_loss(model(x)[0], y) + reg(dict(model.named_parameters()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all()
        # Adam's step is at most lr (1 - beta1) / sqrt(1 - beta2) = 3.16 lr, whatever the gradient
        assert float((p.detach() - start[n]).abs().max()) <= steps * lr * 0.1 / 0.001 ** 0.5 * 1.001


@pytest.mark.parametrize("phi_param", ["free", "softplus"])
def test_prior_round_trips_through_its_stored_state(phi_param):
    """A meta stage stores phi_state(); the target stage rebuilds the prior from it (a softplus
    prior once failed here: the placeholder was built with phi_init 0, which softplus refuses)."""
    from cmkg.regularizers import Regularizer

    shapes = {"a.weight": torch.Size([3, 2]), "b.weight": torch.Size([4])}
    reg = Regularizer("weighted_l2", shapes, phi_param=phi_param, phi_init=0.3)
    with torch.no_grad():
        for r in reg.raw:
            r.add_(torch.randn_like(r))
    back = Regularizer.from_phi_state(reg.phi_state())
    assert back.phi_param == phi_param
    for a, b in zip(reg.phi(), back.phi()):
        assert torch.equal(a, b)
