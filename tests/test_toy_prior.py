"""Algorithm 1 on a linear toy where its fixed point is known in closed form.

Student f(x) = theta . x with one activation tap a = theta * x (B, d, 1, 1); teacher a~ = w_T * x
on the same x. With reduction reg = act = sum, G = L_REG + L_ACT is

    G(theta) = mean_b (theta . x_b - y_b)^2 + sum_j m_j (theta_j - w_T,j)^2,   m_j = mean_b x_bj^2

phi stops moving when theta_G = argmin G is also stationary for F = L_REG + sum_j phi_j theta_j^2:
phi*_j = dL_ACT/dtheta_j / (2 theta_j) = m_j (1 - w_T,j / theta_G,j) (docs/prior-strength.md,
"Transient or fixed point"). Everything runs the project's own ``meta_iteration``, in float64.
"""

import pytest
import torch
from torch import nn

from cmkg import regularizers
from cmkg.meta import fixed_point_phi, meta_iteration, phi_bounds

F64 = torch.float64
RED = {"reg": "sum", "act": "sum"}  # L_ACT = sum_j m_j (theta_j - w_T,j)^2
LOSS_KW = {"losses": ["act"], "lambda_att": 0.0, "att_layers": [], "reduction": RED}


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class LinStudent(nn.Module):
    """pred = theta . x as (B, 1); one activation, theta * x as a (B, d, 1, 1) map."""

    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, 1, bias=False, dtype=F64)

    def forward(self, x):
        return self.fc(x), [(self.fc.weight[0] * x)[:, :, None, None]]


class LinTeacher(nn.Module):
    """The teacher's activation w_T * x; it has no prediction the meta step reads."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x):
        return None, [(self.w * x)[:, :, None, None]]


def _source(n: int, w_src: torch.Tensor, noise: float, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, w_src.numel(), generator=gen, dtype=F64)
    y = x @ w_src + noise * torch.randn(n, generator=gen, dtype=F64)
    return {"rgb": x, "depth": x, "target": y[:, None]}


def _g(theta: torch.Tensor, batch: dict, w_t: torch.Tensor) -> torch.Tensor:
    """G in closed form (the check's own, not the project's)."""
    x, y = batch["rgb"], batch["target"][:, 0]
    return (x @ theta - y).pow(2).mean() + (x.pow(2).mean(0) * (theta - w_t).pow(2)).sum()


def _fixed_point(batch: dict, w_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """theta_G (grad G = 0, a linear solve) and phi* = m (1 - w_T / theta_G)."""
    x, y = batch["rgb"], batch["target"][:, 0]
    n = x.shape[0]
    m = x.pow(2).mean(0)
    theta_g = torch.linalg.solve(x.T @ x / n + torch.diag(m), x.T @ y / n + m * w_t)
    return theta_g, m * (1 - w_t / theta_g)


def _setup(d: int, w_t: torch.Tensor, seed: int = 0):
    torch.manual_seed(seed)
    student = LinStudent(d)
    reg = regularizers.build("weighted_l2", student).double()
    assert reg.names == ["fc.weight"]
    return student, LinTeacher(w_t), reg


def _converged_phi(batch: dict, w_t: torch.Tensor, *, iters: int = 1000, alpha: float = 0.05):
    """Algorithm 1 run to convergence: SGD on theta (to theta_G), Adam on phi, full batch."""
    student, teacher, reg = _setup(w_t.numel(), w_t)
    theta_opt = torch.optim.SGD(student.parameters(), lr=0.1)
    phi_opt = torch.optim.Adam(reg.parameters(), lr=0.01)
    for _ in range(iters):
        meta_iteration(student, nn.Identity(), teacher, reg, batch, theta_opt, phi_opt,
                       alpha=alpha, steps=1, first_order=False, phi_clip=phi_bounds(alpha),
                       **LOSS_KW)
    return student.fc.weight.detach()[0], reg.raw[0].detach()[0]


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _toy1():
    """d = 12; the teacher scales the source weights by s_j != 1, so phi* is away from 0."""
    gen = torch.Generator().manual_seed(0)
    w_src = torch.randn(12, generator=gen, dtype=F64)
    scale = torch.tensor([0.0, 0.25, 0.5, 2.0, 3.0, 4.0], dtype=F64).repeat(2)
    return _source(200, w_src, 0.5, seed=1), scale * w_src


def test_converged_algorithm1_recovers_the_fixed_point():
    batch, w_t = _toy1()
    theta_g, phi_star = _fixed_point(batch, w_t)
    assert phi_star.abs().min() > 0.05 and (phi_star < 0).any() and (phi_star > 0).any()
    assert phi_star.abs().max() < phi_bounds(0.05)[1]  # the stage's default clip stays inactive
    theta, phi = _converged_phi(batch, w_t)
    assert (theta - theta_g).norm() < 1e-10
    ratio = float((phi / phi_star - 1).abs().median())
    assert ratio < 0.01, ratio
    assert _corr(phi, phi_star) > 0.99


def test_fixed_point_solve_is_the_analytic_fixed_point():
    """meta.solve=fixed_point's phi (``fixed_point_phi``) at theta_G is phi*, scaled to mean
    |phi| 1, from the mean over batches (two halves of the source here) of grad L_DIST."""
    batch, w_t = _toy1()
    theta_g, phi_star = _fixed_point(batch, w_t)
    student, teacher, _ = _setup(12, w_t)
    with torch.no_grad():
        student.fc.weight.copy_(theta_g[None])
    halves = [{k: v[:100] for k, v in batch.items()}, {k: v[100:] for k, v in batch.items()}]
    (phi,) = fixed_point_phi(student, nn.Identity(), teacher, halves, ["fc.weight"], eps=1e-12,
                             **LOSS_KW)
    torch.testing.assert_close(phi[0], phi_star / phi_star.abs().mean(), rtol=1e-9, atol=0)


def test_phi_relaxes_with_the_predicted_rate_at_theta_g():
    """theta held at theta_G: phi - phi* <- (I - 4 alpha^2 beta D H D)(phi - phi*), D = diag
    theta_G, H = Hessian of G; its diagonal gives the time constant 1/(4 a^2 b theta_j^2 h_j)."""
    batch, w_t = _toy1()
    theta_g, phi_star = _fixed_point(batch, w_t)
    alpha, beta, iters = 0.05, 2.0, 20
    student, teacher, reg = _setup(12, w_t)
    with torch.no_grad():
        student.fc.weight.copy_(theta_g[None])
    theta_opt = torch.optim.SGD(student.parameters(), lr=0.0)
    phi_opt = torch.optim.SGD(reg.parameters(), lr=beta)
    for _ in range(iters):
        meta_iteration(student, nn.Identity(), teacher, reg, batch, theta_opt, phi_opt,
                       alpha=alpha, steps=1, first_order=False, **LOSS_KW)
    x = batch["rgb"]
    hess = 2 * (x.T @ x / x.shape[0] + torch.diag(x.pow(2).mean(0)))
    step = torch.eye(12, dtype=F64) - 4 * alpha**2 * beta * theta_g[:, None] * hess * theta_g
    predicted = torch.linalg.matrix_power(step, iters) @ (-phi_star)  # phi_0 = 0
    moved = reg.raw[0].detach()[0] - phi_star
    assert (predicted + phi_star).norm() > 0.1 * phi_star.norm()  # phi did move
    assert (moved - predicted).norm() < 1e-12 * phi_star.norm()


def test_paper_regime_is_the_first_order_transient():
    """alpha = 2.5e-4, SGD beta = 1e-3 from phi = 0: phi = 2 alpha beta sum_k theta_k * grad
    G(theta_k) up to O(alpha h), far from phi*."""
    batch, w_t = _toy1()
    _, phi_star = _fixed_point(batch, w_t)
    alpha, beta = 2.5e-4, 1e-3
    student, teacher, reg = _setup(12, w_t)
    theta_opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    phi_opt = torch.optim.SGD(reg.parameters(), lr=beta)
    transient = torch.zeros(12, dtype=F64)
    for _ in range(300):
        theta = student.fc.weight.detach()[0].clone().requires_grad_()
        g = _g(theta, batch, w_t)
        transient += theta.detach() * torch.autograd.grad(g, theta)[0]
        parts = meta_iteration(student, nn.Identity(), teacher, reg, batch, theta_opt, phi_opt,
                               alpha=alpha, steps=1, first_order=False,
                               phi_clip=phi_bounds(alpha), **LOSS_KW)
        torch.testing.assert_close(parts["loss"], g.detach(), rtol=1e-12, atol=0)
    transient *= 2 * alpha * beta
    phi = reg.raw[0].detach()[0]
    rel = float((phi - transient).norm() / transient.norm())
    assert rel < 2e-3, rel
    assert phi.norm() / phi_star.norm() < 1e-3


# ---------------------------------------------------------------------------------------------
# Toy 2: the knowledge is the support; held-out error of generalised ridge under each prior
# ---------------------------------------------------------------------------------------------

D, SUPPORT, NOISE = 40, 8, 1.0
GRID = torch.logspace(-4, 4, 33, dtype=F64)


@pytest.fixture(scope="module")
def support_prior():
    """w_true non-zero on 8 of 40 coordinates; the teacher knows it (w_T = w_true), the source
    labels also load on the other 32, so least squares on the source puts weight off S."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope: set up before the per-test thread fixture
    try:
        return _support_prior()
    finally:
        torch.set_num_threads(before)


def _support_prior() -> dict:
    gen = torch.Generator().manual_seed(10)
    on = torch.zeros(D, dtype=torch.bool)
    on[torch.randperm(D, generator=gen)[:SUPPORT]] = True
    sign = torch.sign(torch.randn(D, generator=gen, dtype=F64))
    w_true = torch.where(on, torch.rand(D, generator=gen, dtype=F64) + 0.5, 0.0) * sign
    sign = torch.sign(torch.randn(D, generator=gen, dtype=F64))
    w_src = w_true + torch.where(on, 0.0, 0.5 * torch.rand(D, generator=gen, dtype=F64) + 0.3) * sign
    batch = _source(1000, w_src, 0.5, seed=11)
    _, phi_star = _fixed_point(batch, w_true)
    _, phi = _converged_phi(batch, w_true)
    return {"on": on, "w_true": w_true, "phi": phi, "phi_star": phi_star}


def test_learned_phi_is_the_support(support_prior):
    on, phi, phi_star = support_prior["on"], support_prior["phi"], support_prior["phi_star"]
    ratio = float((phi / phi_star - 1).abs().median())
    assert ratio < 0.01, ratio
    assert _corr(phi, phi_star) > 0.99
    assert phi[on].abs().max() < 0.1 * phi[~on].min()  # ~0 on S, > 0 off S


def _ridge(x, y, penalty):
    """argmin ||x theta - y||^2 / n + sum_j penalty_j theta_j^2."""
    n = x.shape[0]
    return torch.linalg.solve(x.T @ x / n + torch.diag(penalty), x.T @ y / n)


def _mse(x, y, theta) -> float:
    return float((x @ theta - y).pow(2).mean())


def _target(w_true, seed):
    gen = torch.Generator().manual_seed(seed)

    def split(n):
        x = torch.randn(n, D, generator=gen, dtype=F64)
        return x, x @ w_true + NOISE * torch.randn(n, generator=gen, dtype=F64)

    return split(30), split(30), split(5000)  # train (n < d), val, test


def excess_mse(prior: dict, draws: int = 20) -> dict[str, float]:
    """Mean over draws of test MSE - noise variance for each prior, strengths chosen on val.
    The permuted control takes a new permutation per draw (like ``run.seed`` does per seed)."""
    w_true, phi = prior["w_true"], prior["phi"]
    out = {k: 0.0 for k in ("none", "l2", "phi", "permuted", "analytic")}
    for i in range(draws):
        (xtr, ytr), (xva, yva), (xte, yte) = _target(w_true, 100 + i)
        out["none"] += _mse(xte, yte, torch.linalg.pinv(xtr) @ ytr) - NOISE**2
        shapes = {"l2": torch.ones(D, dtype=F64), "phi": phi,
                  "permuted": regularizers.permuted([phi], seed=i)[0],
                  "analytic": 1.0 / (w_true.pow(2) + 1e-6)}
        for name, shape in shapes.items():
            fits = [_ridge(xtr, ytr, c * shape) for c in GRID]
            best = min(fits, key=lambda t: _mse(xva, yva, t))
            out[name] += _mse(xte, yte, best) - NOISE**2
    return {k: v / draws for k, v in out.items()}


def test_heldout_ordering_analytic_phi_l2_permuted(support_prior):
    ex = excess_mse(support_prior)
    assert ex["analytic"] <= ex["phi"] < ex["l2"] < ex["permuted"], ex
