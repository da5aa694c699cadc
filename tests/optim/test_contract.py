"""Contract of every registered optimizer: checkpoints resume bit for bit, steps descend, ``p.grad`` is read only,
dtypes are kept, a manifold parameter never reaches a Euclidean optimizer, Riemannian steps stay on the manifold.

Every test is parametrized over :func:`manifoldnorm.optim.list_optimizers` and builds through
:func:`~manifoldnorm.optim.build_optimizer` with the registry's defaults, so a newly registered optimizer is tested
here with no edit. The only option given is ``lr = LR`` to every optimizer that takes ``lr`` (SGD and SGDP have
no default learning rate, and one value keeps the problems comparable). The matrix optimizers (Muon, NorMuon,
Conda, SinkGD) update only ``ndim >= 2`` parameters and refuse vectors at construction, so the problems are built
from matrices (and a conv-shaped 4-D tensor), plus a vector for the optimizers that take one (probed with
:func:`_takes_vectors`).
"""

from __future__ import annotations

import inspect
import io
import math
from typing import Any

import geoopt
import pytest
import torch
from torch import Tensor, nn

from manifoldnorm.optim import build_optimizer, create_optimizer, get_optimizer, list_optimizers
from manifoldnorm.optim._validate import check_no_manifold_params

NAMES = list_optimizers()
EUCLIDEAN = list_optimizers("euclidean")
RIEMANNIAN = list_optimizers("riemannian")
LR = 0.1
F64 = torch.float64

# Half precision: every registered optimizer takes float16 and bfloat16 parameters (none documents a refusal), but
# Adam's eps = 1e-8 is 0 in float16 and (1 - beta2) g^2 underflows for |g| < 8e-3, so a small gradient entry gives
# m / 0 = inf or 0 / 0 = NaN, as in torch.optim.Adam (AdamP is torch's Adam on unprojected weights, by design).
# Pure float16 Adam needs a larger eps; bfloat16 (float32's exponent range) is fine. xfail(strict): a fix XPASSes.
FLOAT16_UNSAFE = {
    name: "Adam in float16: eps = 1e-8 rounds to 0 and small second moments underflow (inf/NaN)"
    for name in ("adam", "adamw", "adamp", "riemannian_adam")
}

# geoopt adds the weight decay into p.grad in place (``grad.add_(point, alpha=weight_decay)``) and RiemannianSGD's
# Nesterov step writes p.grad too; with the defaults (no decay, no Nesterov) p.grad is untouched. A fix shows up
# as an XPASS (strict), which fails, so the entry is then removed.
WRITES_GRAD_WITH_OPTIONS = {
    "riemannian_adam": "geoopt.optim.RiemannianAdam: grad.add_(point, alpha=weight_decay)",
    "riemannian_sgd": "geoopt.optim.RiemannianSGD: grad.add_(point, alpha=weight_decay) and the Nesterov step",
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _kwargs(name: str) -> dict[str, Any]:
    return {"lr": LR} if "lr" in get_optimizer(name).keyword_names() else {}


def _exercising(name: str) -> dict[str, Any]:
    """Options that switch on the code paths the defaults leave off: weight decay, momentum, the other Nesterov."""
    info = get_optimizer(name)
    accepted = info.keyword_names()
    options: dict[str, Any] = {}
    if "weight_decay" in accepted:
        options["weight_decay"] = 0.1
    if "momentum" in accepted:
        options["momentum"] = 0.9
    if "nesterov" in accepted:
        default = inspect.signature(info.cls).parameters["nesterov"].default
        options["nesterov"] = default is not True  # flip the default (a missing default counts as False)
    return options


def _takes_vectors(name: str) -> bool:
    try:
        build_optimizer(name, [nn.Parameter(torch.zeros(3))], **_kwargs(name))
    except ValueError:
        return False
    return True


def _stiefel(seed: int = 0, shape: tuple[int, int] = (5, 3)) -> geoopt.ManifoldParameter:
    q, _ = torch.linalg.qr(torch.randn(*shape, generator=_gen(seed), dtype=F64))
    return geoopt.ManifoldParameter(q, manifold=geoopt.Stiefel())


def _params(name: str, dtype: torch.dtype = F64, manifold: bool = True) -> list[Tensor]:
    """Matrices of both orientations, a conv kernel, a vector if taken, a Stiefel matrix for Riemannian kinds.

    Values are drawn in float32, so they are exact in float64; for half dtypes they are rounded to that dtype.
    """
    shapes = [(4, 6), (6, 3), (3, 2, 2, 2)] + ([(5,)] if _takes_vectors(name) else [])
    rounding = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    params: list[Tensor] = [nn.Parameter(torch.randn(s, generator=_gen(i)).to(rounding).to(dtype))
                            for i, s in enumerate(shapes)]
    if manifold and get_optimizer(name).kind == "riemannian":
        params.append(_stiefel())
    return params


def _set_grads(params: list[Tensor], t: int) -> list[Tensor]:
    """Fixed gradients of step ``t`` (drawn like the values; independent of the parameters)."""
    for i, p in enumerate(params):
        rounding = p.dtype if p.dtype in (torch.float16, torch.bfloat16) else torch.float32
        p.grad = torch.randn(p.shape, generator=_gen(1000 * (t + 1) + i)).to(rounding).to(p.dtype)
    return [p.grad for p in params]


def _clone(p: Tensor) -> Tensor:
    if isinstance(p, geoopt.ManifoldParameter):
        return geoopt.ManifoldParameter(p.detach().clone(), manifold=p.manifold)
    return nn.Parameter(p.detach().clone())


def _identical(a: Tensor, b: Tensor) -> bool:
    """Bit for bit (unlike torch.equal, -0.0 differs from 0.0 and a NaN equals the same NaN)."""
    return a.dtype == b.dtype and torch.equal(a.detach().contiguous().view(torch.uint8),
                                              b.detach().contiguous().view(torch.uint8))


def _groups(name: str, params: list[Tensor]) -> list[dict[str, Any]]:
    second = {"lr": LR / 2} if "lr" in get_optimizer(name).keyword_names() else {}
    return [{"params": params[:2]}, {"params": params[2:], **second}]


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_gives_bit_identical_steps(name: str) -> None:
    """Three steps, state_dict through torch.save/torch.load(weights_only=True), a fresh optimizer (built with
    another lr: the groups' options must come from the state dict) loads it; both then take the same three steps."""
    params = _params(name)
    opt = build_optimizer(name, _groups(name, params), **_kwargs(name))
    for t in range(3):
        _set_grads(params, t)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    clones = [_clone(p) for p in params]
    kwargs = {k: 3 * v for k, v in _kwargs(name).items()}
    resumed = build_optimizer(name, _groups(name, clones), **kwargs)
    resumed.load_state_dict(saved)
    for t in range(3, 6):
        _set_grads(params, t)
        _set_grads(clones, t)
        opt.step()
        resumed.step()
        for i, (p, q) in enumerate(zip(params, clones, strict=True)):
            same = _identical(p, q)
            assert same, f"{name}: parameter {i} differs after resumed step {t}"


# ---------------------------------------------------------------------------------------------------- descent
def _least_squares() -> tuple[list[nn.Parameter], Any]:
    """0.5 ||A W1 - B1||^2 + 0.5 ||W2 C - B2||^2 for a tall (6, 4) and a wide (3, 5) weight.

    A (24 x 6) and C (5 x 20) have entries N(0, 1/rows) resp. N(0, 1/cols), so their singular values are about
    1 and the Hessian's eigenvalues lie in about [0.25, 2.3]: ``LR`` is a stable step for SGD (gradient-sized steps)
    and about a tenth of the solution's entries for the normalized optimizers (Adam, Muon, SinkGD, ...).
    Exactly solvable (B = A W* , W* C): the minimum is 0.
    """
    A = torch.randn(24, 6, generator=_gen(0), dtype=F64) / math.sqrt(24)
    C = torch.randn(5, 20, generator=_gen(1), dtype=F64) / math.sqrt(20)
    B1 = A @ torch.randn(6, 4, generator=_gen(2), dtype=F64)
    B2 = torch.randn(3, 5, generator=_gen(3), dtype=F64) @ C
    W1 = nn.Parameter(torch.randn(6, 4, generator=_gen(4), dtype=F64))
    W2 = nn.Parameter(torch.randn(3, 5, generator=_gen(5), dtype=F64))
    return [W1, W2], lambda: 0.5 * ((A @ W1 - B1).pow(2).sum() + (W2 @ C - B2).pow(2).sum())


@pytest.mark.parametrize("name", NAMES)
def test_descent_on_matrix_least_squares(name: str) -> None:
    """150 steps with the defaults and lr = LR: half the loss gone by step 75, 95% by step 150.

    Measured: every optimizer ends below 1e-2 of the initial loss (Conda, scale 0.25, is slowest: 8e-3). A sign
    flip makes the loss grow; a zero update leaves it, or, with Muon's default weight decay 0.1, leaves 40%.
    """
    params, loss_fn = _least_squares()
    opt = build_optimizer(name, params, **_kwargs(name))
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    losses.append(loss_fn().item())
    assert losses[75] < 0.5 * losses[0], f"{name}: {losses[0]:.3g} -> {losses[75]:.3g} after 75 steps"
    assert losses[-1] < 0.05 * losses[0], f"{name}: {losses[0]:.3g} -> {losses[-1]:.3g} after 150 steps"


# ---------------------------------------------------------------------------------------------- p.grad is read
def _grad_cases() -> list[Any]:
    cases = []
    for name in NAMES:
        cases.append(pytest.param(name, False, id=f"{name}-defaults"))
        marks = [pytest.mark.xfail(strict=True, reason=WRITES_GRAD_WITH_OPTIONS[name])] \
            if name in WRITES_GRAD_WITH_OPTIONS else []
        cases.append(pytest.param(name, True, id=f"{name}-decay-momentum-nesterov", marks=marks))
    return cases


@pytest.mark.parametrize(("name", "exercise"), _grad_cases())
def test_step_never_writes_grad(name: str, exercise: bool) -> None:
    params = _params(name)
    opt = build_optimizer(name, params, **_kwargs(name), **(_exercising(name) if exercise else {}))
    for t in range(3):
        grads = _set_grads(params, t)
        before = [g.clone() for g in grads]
        opt.step()
        for i, (p, g) in enumerate(zip(params, before, strict=True)):
            same = _identical(p.grad, g)
            assert same, f"{name}: step {t} wrote the gradient of parameter {i}"


# ---------------------------------------------------------------------------------------------------- dtypes
def _full_precision(name: str) -> dict[str, Any]:
    """Options that make an optimizer compute in the parameter's dtype throughout: ``ns_dtype=None`` for those whose
    Newton–Schulz runs in a fixed lower precision by default (Muon, NorMuon: bfloat16, as torch.optim.Muon)."""
    info = get_optimizer(name)
    if "ns_dtype" in info.keyword_names() and inspect.signature(info.cls).parameters["ns_dtype"].default is not None:
        return {"ns_dtype": None}
    return {}


def _steps(name: str, dtype: torch.dtype, rounding: torch.dtype, nudge: float = 0.0, **options: Any) -> list[Tensor]:
    """Three steps on parameters of ``dtype`` whose values and gradients are exact in ``rounding``; ``nudge``
    multiplies each gradient entry by 1 + nudge * N(0, 1); ``options`` go to the optimizer."""
    params = _params(name, rounding, manifold=False)
    params = [nn.Parameter(p.detach().to(dtype)) for p in params]
    start = [p.detach().clone() for p in params]
    opt = build_optimizer(name, params, **_kwargs(name), **options)
    for t in range(3):
        _set_grads(params, t)
        for i, p in enumerate(params):  # the gradients of the reference run, exact in `dtype` too
            p.grad = p.grad.to(rounding).to(dtype)
            if nudge:
                p.grad = p.grad * (1 + nudge * torch.randn(p.shape, generator=_gen(7 + i + 10 * t), dtype=dtype))
        opt.step()
    for p in params:
        assert p.dtype == dtype, f"{name}: a {dtype} parameter became {p.dtype}"
        assert bool(torch.isfinite(p).all()), f"{name}: non-finite {dtype} parameter"
    return [(p.detach() - s).double() for p, s in zip(params, start, strict=True)]


def _dtype_cases() -> list[Any]:
    cases = []
    for name in NAMES:
        for dtype in (torch.float64, torch.float16, torch.bfloat16):
            marks = [pytest.mark.xfail(strict=True, reason=FLOAT16_UNSAFE[name])] \
                if dtype == torch.float16 and name in FLOAT16_UNSAFE else []
            cases.append(pytest.param(name, dtype, id=f"{name}-{str(dtype).removeprefix('torch.')}", marks=marks))
    return cases


@pytest.mark.parametrize(("name", "dtype"), _dtype_cases())
def test_dtype_is_kept_and_steps_match_float32(name: str, dtype: torch.dtype) -> None:
    """Parameters keep their dtype and stay finite; three steps (the change of the parameters) match a float32 run
    to 1e-4 relative in float64 (measured <= 1.2e-6) and to 0.3 in float16/bfloat16 (measured <= 0.1: Newton–Schulz
    and the SVD in bfloat16). Both runs start from the same values and see the same gradients, exact in either
    dtype. (Muon and NorMuon run Newton–Schulz in bfloat16 by default, as torch.optim.Muon, so their float64 and
    float32 runs see the same bfloat16 iterates; Conda and SinkGD compute in at least float32, NorMuon keeps its
    second moment in float32: all keep the parameter's dtype.)

    float64 can be computed in float64 throughout: gradients nudged by 1e-12 (relative, far below float32's 6e-8)
    change the float64 steps by 1e-14..1e-9 (measured 3e-13..4e-12). A step computed in float32 or lower anywhere
    would round the nudge away (no change) or jump by a float32 rounding step (>= 1e-8). Muon and NorMuon are
    nudged with ``ns_dtype=None`` (their full-precision option, :func:`_full_precision`): with the bfloat16 default
    the nudge is rounded away, as it must be."""
    half = dtype in (torch.float16, torch.bfloat16)
    rounding = dtype if half else torch.float32
    reference = _steps(name, torch.float32, rounding)
    steps = _steps(name, dtype, rounding)
    tol = 0.3 if half else 1e-4
    for i, (s, r) in enumerate(zip(steps, reference, strict=True)):
        assert r.norm() > 0, f"{name}: the float32 run did not move parameter {i}"
        err = float((s - r).norm() / r.norm())
        assert err < tol, f"{name}: the {dtype} step of parameter {i} differs from float32 by {err:.2e} (relative)"
    if dtype == torch.float64:
        full = _full_precision(name)
        steps = _steps(name, dtype, rounding, **full) if full else steps
        nudged = _steps(name, dtype, rounding, nudge=1e-12, **full)
        for i, (s, n) in enumerate(zip(steps, nudged, strict=True)):
            change = float((n - s).norm() / s.norm())
            assert 1e-14 < change < 1e-9, f"{name}: a 1e-12 nudge of the gradients changed the float64 step of " \
                                          f"parameter {i} by {change:.1e} (relative): not computed in float64"


# ------------------------------------------------------------------------------------- manifold parameters
def _expected(params: list[Tensor], optimizer: str, **kw: Any) -> str:
    with pytest.raises(ValueError) as err:
        check_no_manifold_params(params, optimizer, **kw)
    return str(err.value)


def test_manifold_error_wording() -> None:
    w = _stiefel()
    message = _expected([nn.Parameter(torch.ones(2)), w], "muon")
    assert type(w.manifold).__name__ == "CanonicalStiefel"  # what geoopt.Stiefel() builds
    assert message == (
        "parameter of shape (5, 3) is a geoopt.ManifoldParameter on CanonicalStiefel but would be updated by the "
        "Euclidean optimizer 'muon', which leaves the manifold; route manifold parameters to a Riemannian optimizer "
        f"({', '.join(RIEMANNIAN)})"
    )
    groups = [{"params": (p for p in [w])}]
    assert _expected(groups, "sgd", names={id(w): "'w'"}, key="rest").startswith(
        "parameter 'w' is a geoopt.ManifoldParameter on CanonicalStiefel but would be updated by the Euclidean "
        "optimizer 'sgd' (sub-optimizer 'rest'), which leaves the manifold")
    euclidean = geoopt.ManifoldParameter(torch.ones(2, 2))  # geoopt's Euclidean manifold: a plain tensor
    assert check_no_manifold_params(iter([euclidean]), "muon") == [euclidean]


@pytest.mark.parametrize("name", EUCLIDEAN)
def test_euclidean_optimizers_refuse_manifold_parameters(name: str) -> None:
    """build_optimizer, the class itself (the library's own) and create_optimizer refuse a Stiefel parameter with
    the one message of check_no_manifold_params, however the parameters are given; nothing else is refused."""
    plain, w = nn.Parameter(torch.randn(4, 3, dtype=F64)), _stiefel()
    kwargs = _kwargs(name)
    expected = _expected([w], name)
    for params in ([plain, w], (p for p in [plain, w]), [{"params": [plain]}, {"params": (p for p in [w])}],
                   [{"params": w}]):
        with pytest.raises(ValueError) as err:
            build_optimizer(name, params, **kwargs)
        assert str(err.value) == expected
    cls = get_optimizer(name).cls
    if cls.__module__.startswith("manifoldnorm."):
        with pytest.raises(ValueError) as err:
            cls([plain, w], **kwargs)
        assert str(err.value) == _expected([w], cls.__name__)
        opt = cls([plain], **kwargs)
        with pytest.raises(ValueError) as err:
            opt.add_param_group({"params": (p for p in [w])})
        assert str(err.value) == _expected([w], cls.__name__)
        assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [plain]
    model = nn.Module()
    model.w = w
    with pytest.raises(ValueError) as err:
        create_optimizer(model, manifold=None, rest={"name": name, **kwargs})
    assert str(err.value) == _expected([w], name, names={id(w): "'w'"}, key="rest")
    # a ManifoldParameter on geoopt's Euclidean manifold is a plain tensor: accepted
    build_optimizer(name, [geoopt.ManifoldParameter(torch.randn(4, 3))], **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_parameters_given_as_generators_are_all_held(name: str) -> None:
    """The guard reads the parameters once: generators (top level or a group's) still reach the optimizer whole."""
    params = _params(name)
    constructors = [lambda ps: build_optimizer(name, ps, **_kwargs(name))]
    if get_optimizer(name).cls.__module__.startswith("manifoldnorm."):
        constructors.append(lambda ps: get_optimizer(name).cls(ps, **_kwargs(name)))
    for build in constructors:
        for given in ((p for p in params), [{"params": (p for p in params)}]):
            opt = build(given)
            held = [p for g in opt.param_groups for p in g["params"]]
            assert len(held) == len(params) and all(a is b for a, b in zip(held, params, strict=True))


@pytest.mark.parametrize("name", RIEMANNIAN)
def test_riemannian_steps_stay_on_the_manifold(name: str) -> None:
    """A Stiefel matrix and a unit vector (geoopt.Sphere) are accepted and stay on their manifolds (1e-10) over 30
    steps that minimize tr(Wᵀ S W) + xᵀ S' x: the excess over the minimum on the manifold (7) falls tenfold."""
    W = _stiefel(0, (6, 3))
    x0 = torch.randn(5, generator=_gen(1), dtype=F64)
    x = geoopt.ManifoldParameter(x0 / x0.norm(), manifold=geoopt.Sphere())
    S, S2 = torch.diag(torch.arange(1.0, 7.0, dtype=F64)), torch.diag(torch.arange(1.0, 6.0, dtype=F64))

    def loss_fn() -> Tensor:
        return torch.trace(W.mT @ S @ W) + x @ S2 @ x

    minimum = 1.0 + 2.0 + 3.0 + 1.0
    opt = build_optimizer(name, [W, x], **_kwargs(name))
    excess0 = loss_fn().item() - minimum
    for _ in range(30):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        assert (W.detach().mT @ W.detach() - torch.eye(3, dtype=F64)).abs().max() < 1e-10, f"{name}: left Stiefel"
        assert abs(float(x.detach().norm()) - 1.0) < 1e-10, f"{name}: left the sphere"
    excess = loss_fn().item() - minimum
    assert -1e-10 < excess < 0.1 * excess0, f"{name}: excess loss {excess0:.3g} -> {excess:.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_vectors_are_stepped_or_refused_at_construction(name: str) -> None:
    """An optimizer that cannot update vectors refuses them when built and when a group is added, saying so."""
    w, b = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3))
    if _takes_vectors(name):
        opt = build_optimizer(name, [w, b], **_kwargs(name))
        b0 = b.detach().clone()
        w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
        opt.step()
        assert not torch.equal(b.detach(), b0)
        return
    with pytest.raises(ValueError, match="vectors"):
        build_optimizer(name, [w, b], **_kwargs(name))
    opt = build_optimizer(name, [w], **_kwargs(name))
    with pytest.raises(ValueError, match="vectors"):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1
