"""One optimizer object over several sub-optimizers: Riemannian for manifold parameters, Euclidean for the rest.

Parameters are assigned by ordered rules (first match wins, every trainable parameter is claimed), and the
sub-optimizers are hidden behind a single :class:`torch.optim.Optimizer`, so LR schedulers, Lightning's
automatic optimisation, gradient clipping and checkpointing see one optimizer.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from geoopt.optim.mixin import OptimMixin
from torch import Tensor, nn

from manifoldnorm.optim._validate import check_no_manifold_params, check_options, is_manifold_tensor
from manifoldnorm.optim.registry import _plain, build_optimizer, get_optimizer, list_optimizers

__all__ = [
    "Rule",
    "CompositeOptimizer",
    "create_optimizer",
    "hidden_matrices",
    "is_manifold_parameter",
    "DEFAULT_MANIFOLD",
    "DEFAULT_REST",
]

DEFAULT_MANIFOLD: Mapping[str, Any] = MappingProxyType({"name": "riemannian_adam"})
DEFAULT_REST: Mapping[str, Any] = MappingProxyType({"name": "adamw"})


def is_manifold_parameter(name: str, param: Tensor) -> bool:
    """True for a ``geoopt`` manifold tensor whose manifold is not Euclidean (Stiefel, SPD, ...)."""
    return is_manifold_tensor(param)


def _always(name: str, param: Tensor) -> bool:
    return True


@dataclass(frozen=True)
class Rule:
    """Send the parameters matched by ``match(name, param)`` to the sub-optimizer called ``optimizer``."""

    optimizer: str
    match: Callable[[str, Tensor], bool]


class _StateView(MutableMapping):
    """Live ``param -> state`` view over the sub-optimizers' ``state`` dicts (writes go to the owner)."""

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
        self._optimizers = optimizers

    def _owner(self, param: Tensor) -> torch.optim.Optimizer:
        for opt in self._optimizers.values():
            if param in opt.state or any(p is param for g in opt.param_groups for p in g["params"]):
                return opt
        raise KeyError("tensor is not optimized by this composite optimizer")

    def __getitem__(self, param: Tensor) -> Any:
        for opt in self._optimizers.values():
            if param in opt.state:
                return opt.state[param]
        raise KeyError("no optimizer state for this tensor")

    def __setitem__(self, param: Tensor, value: Any) -> None:
        self._owner(param).state[param] = value

    def __delitem__(self, param: Tensor) -> None:
        del self._owner(param).state[param]

    def __iter__(self) -> Iterator[Tensor]:
        for opt in self._optimizers.values():
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers.values())


class CompositeOptimizer(torch.optim.Optimizer):
    """Several optimizers behind one ``torch.optim.Optimizer`` interface.

    ``param_groups`` is the concatenation of the sub-optimizers' group dicts (the same dict objects, so an
    LR scheduler that sets ``group["lr"]`` changes the sub-optimizer), ``state`` is a live view of their
    states, ``step``/``zero_grad`` delegate, and ``state_dict`` nests the sub-optimizers' state dicts by name.

    Parameters
    ----------
    optimizers : mapping of str to torch.optim.Optimizer
        Named sub-optimizers over disjoint parameter sets.
    rules : sequence of Rule, optional
        Ordered routing rules used by :meth:`add_param_group` (first match wins).

    Raises
    ------
    ValueError
        If a manifold parameter (see :func:`is_manifold_parameter`) is held by an optimizer that is not a
        geoopt Riemannian optimizer, or if a parameter appears in two sub-optimizers.
    """

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer], rules: Sequence[Rule] = ()) -> None:
        if not optimizers:
            raise ValueError("CompositeOptimizer needs at least one sub-optimizer")
        for name, opt in optimizers.items():
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"sub-optimizer {name!r} is a {type(opt).__name__}, not a torch.optim.Optimizer")
            _check_geometry(name, opt.param_groups, opt)
        self.optimizers: dict[str, torch.optim.Optimizer] = dict(optimizers)
        self.rules: tuple[Rule, ...] = tuple(rules)
        params = [p for opt in self.optimizers.values() for g in opt.param_groups for p in g["params"]]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter is held by more than one sub-optimizer")
        self._building = True
        super().__init__(params, defaults={})  # hooks, step patching; groups and state are replaced below
        self._building = False
        self._sync_groups()
        self.state = _StateView(self.optimizers)

    def _sync_groups(self) -> None:
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={type(opt).__name__}" for name, opt in self.optimizers.items())
        return f"{type(self).__name__}({inner})"

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Evaluate ``closure`` once (with gradients enabled), then step every sub-optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        inner = state_dict.get("optimizers") if isinstance(state_dict, Mapping) else None
        if not isinstance(inner, Mapping) or set(inner) != set(self.optimizers):
            got = sorted(inner) if isinstance(inner, Mapping) else type(state_dict).__name__
            raise ValueError(
                f"state dict does not match this composite optimizer: expected sub-optimizers "
                f"{sorted(self.optimizers)}, got {got}"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(inner[name])  # riemannian_adam keeps its integer steps itself (optim/riemannian.py)
        self._sync_groups()  # load_state_dict replaces the sub-optimizers' group dicts

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the sub-optimizer chosen by ``param_group.pop("optimizer")`` or by the rules."""
        if getattr(self, "_building", True):
            super().add_param_group(param_group)
            return
        group = dict(param_group)
        params = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
        group["params"] = params
        target = group.pop("optimizer", None)
        if target is None:
            targets = {_route(self.rules, "", p) for p in params}
            if len(targets) != 1:
                raise ValueError(f"the new group's parameters match different sub-optimizers: {sorted(targets)}")
            target = targets.pop()
        if target not in self.optimizers:
            raise ValueError(f"unknown sub-optimizer {target!r}; this optimizer has {sorted(self.optimizers)}")
        check_options({k: v for k, v in group.items() if k != "params"}, owner=f"sub-optimizer {target!r}")
        _check_geometry(target, [group], self.optimizers[target])
        self.optimizers[target].add_param_group(group)
        self._sync_groups()


def _route(rules: Sequence[Rule], name: str, param: Tensor) -> str:
    for rule in rules:
        if rule.match(name, param):
            return rule.optimizer
    raise ValueError(f"no optimizer rule claims parameter {name or tuple(param.shape)!r}")


def _check_geometry(
    opt_name: str, groups: Iterable[Mapping[str, Any]], opt: Any, names: Mapping[int, str] | None = None,
    key: str | None = None,
) -> None:
    if isinstance(opt, OptimMixin) or (isinstance(opt, type) and issubclass(opt, OptimMixin)):
        return
    check_no_manifold_params(groups, opt_name, names=names, key=key)


def _spec(spec: Mapping[str, Any], role: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(spec, Mapping):
        raise TypeError(f"{role}: expected a mapping with a 'name' key, got {type(spec).__name__}")
    kwargs = dict(spec)
    name = kwargs.pop("name", None)
    if name is None:
        raise ValueError(f"{role}: missing 'name'; valid optimizers: {', '.join(list_optimizers())}")
    get_optimizer(name)  # unknown names fail here even when no parameter is routed to this optimizer
    check_options(kwargs, role)  # and bad values ("rest.lr must be a real number >= 0, got 'abc' (str)")
    return name, kwargs


_NOT_HIDDEN = re.compile(r"(^|\.)(lm_head|head|classifier|wte|wpe|embed\w*|embedding\w*)(\.|$)")


def hidden_matrices(model: nn.Module | Iterable[tuple[str, Tensor]]) -> set[int]:
    """``id`` s of the hidden matrix parameters: ndim >= 2 (conv kernels included), not an ``nn.Embedding`` weight
    and not named like an embedding or output head (``wte``, ``wpe``, ``embed*``, ``head``, ``lm_head``,
    ``classifier``). These are what normalized optimizers (Muon, NorMuon, ...) are meant for."""
    if isinstance(model, nn.Module):
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        named = list(model.named_parameters())
    else:
        embeddings, named = set(), list(model)
    return {id(p) for n, p in named if p.ndim >= 2 and id(p) not in embeddings and not _NOT_HIDDEN.search(n)}


_ROLES = ("manifold", "matrix", "rest")


@dataclass(frozen=True)
class _NameRule:
    """A parsed entry of ``create_optimizer(rules=...)``."""

    key: str
    pattern: re.Pattern
    spec: tuple[str, dict[str, Any]] | None  # own sub-optimizer: (registry name, kwargs)
    into: str | None  # or: a separate parameter group of this sub-optimizer
    overrides: dict[str, Any]


def _parse_rules(rules: Sequence[Mapping[str, Any]]) -> list[_NameRule]:
    parsed: list[_NameRule] = []
    keys = list(_ROLES)
    for i, rule in enumerate(rules):
        where = f"rules[{i}]"
        if not isinstance(rule, Mapping):
            raise TypeError(f"{where}: expected a mapping with 'match' and 'name' or 'into', got {type(rule).__name__}")
        entry = dict(rule)
        pattern = entry.pop("match", None)
        if not isinstance(pattern, str):
            raise ValueError(f"{where}: 'match' must be a regular expression (searched in parameter names), "
                             f"got {pattern!r}")
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{where}: invalid regular expression {pattern!r}: {err}") from None
        into = entry.pop("into", None)
        key = entry.pop("key", None)
        if (into is None) == ("name" not in entry):
            raise ValueError(f"{where}: give either 'name' (a sub-optimizer of its own; valid optimizers: "
                             f"{', '.join(list_optimizers())}) or 'into' (a parameter group of one of "
                             f"{', '.join(keys)})")
        if into is not None:
            if key is not None:
                raise ValueError(f"{where}: 'key' names a sub-optimizer of its own; it cannot go with 'into'")
            if into not in keys:
                raise ValueError(f"{where}: unknown sub-optimizer {into!r} for 'into'; valid: {', '.join(keys)}")
            check_options(entry, where)
            parsed.append(_NameRule(f"{into}[{i}]", compiled, None, into, entry))
            continue
        key = f"rule{i}" if key is None else str(key)
        if key in keys:
            raise ValueError(f"{where}: sub-optimizer key {key!r} is already used; taken: {', '.join(keys)}")
        keys.append(key)
        parsed.append(_NameRule(key, compiled, _spec(entry, where), None, {}))
    return parsed


def create_optimizer(
    model: nn.Module | Iterable[tuple[str, Tensor]],
    manifold: Mapping[str, Any] | None = DEFAULT_MANIFOLD,
    rest: Mapping[str, Any] = DEFAULT_REST,
    matrix: Mapping[str, Any] | None = None,
    rules: Sequence[Mapping[str, Any]] = (),
) -> CompositeOptimizer:
    r"""Build a :class:`CompositeOptimizer` for ``model`` from ordered rules: first match wins, every parameter claimed.

    Rules are tried in the order: the name ``rules`` (as given), ``manifold``, ``matrix``, ``rest``.

    Parameters
    ----------
    model : nn.Module or iterable of (name, parameter)
        Only parameters with ``requires_grad`` are optimized.
    manifold : mapping or None
        ``{"name": <registry key>, **kwargs}`` for the parameters that are ``geoopt.ManifoldParameter`` on a
        non-Euclidean manifold (BiMap Stiefel weights, SPD biases); default Riemannian Adam. ``None`` sends
        them to ``rest``, which then must be Riemannian.
    rest : mapping
        ``{"name": <registry key>, **kwargs}`` for every other parameter; default AdamW.
    matrix : mapping or None
        ``{"name": <registry key>, **kwargs}`` for the hidden matrices (:func:`hidden_matrices`) that are not
        manifold parameters, e.g. ``{"name": "normuon", "lr": 0.02}``; ``None`` (default) sends them to ``rest``.
    rules : sequence of mappings
        Rules by parameter name, tried before the three above. Each has ``"match"``, a regular expression
        searched (:func:`re.search`) in the dotted parameter name, and either

        * ``"name"`` (+ keyword arguments, optional ``"key"``): a sub-optimizer of its own, named ``key``
          (default ``"rule<i>"``), e.g. ``{"match": r"^blocks\.0\.", "name": "sgd", "lr": 0.1}``; or
        * ``"into"``: one of ``"manifold"``, ``"matrix"``, ``"rest"``, plus group options that override that
          sub-optimizer's arguments for the matched parameters (a separate parameter group), e.g.
          ``{"match": r"\.bias$|norm", "into": "rest", "weight_decay": 0.0}``.

        A rule that matches no trainable parameter gives a warning (usually a typo).

    Returns
    -------
    CompositeOptimizer
        Sub-optimizers named ``"manifold"``, ``"matrix"``, ``"rest"`` and the rules' keys; one whose parameter set
        is empty is omitted.

    Raises
    ------
    ValueError
        Unknown optimizer name, keyword or group option (the message lists the valid ones), an invalid regular
        expression, a manifold parameter routed to a Euclidean optimizer (by any rule), no trainable
        parameters, or a hyper-parameter out of range; the message names the option by its key, e.g.
        ``rest.lr`` or ``rules[0].weight_decay``.
    TypeError
        A hyper-parameter of the wrong type (``lr: abc``, ``nesterov: maybe``), named the same way.
    """
    named = list(model.named_parameters() if isinstance(model, nn.Module) else model)
    named = [(n, p) for n, p in named if p.requires_grad]
    if not named:
        raise ValueError("create_optimizer: the model has no trainable parameters")
    name_rules = _parse_rules(rules)
    specs: dict[str, tuple[str, dict[str, Any]]] = {}
    routes: list[Rule] = []
    for rule in name_rules:  # a rule's key routes to its own optimizer, or to the group of the one it joins
        if rule.spec is not None:
            specs[rule.key] = rule.spec
        routes.append(Rule(rule.key, lambda n, p, pat=rule.pattern: bool(n) and pat.search(n) is not None))
    if manifold is not None:
        specs["manifold"] = _spec(manifold, "manifold")
        routes.append(Rule("manifold", is_manifold_parameter))
    if matrix is not None:
        hidden = hidden_matrices(named)
        if isinstance(model, nn.Module):
            hidden &= hidden_matrices(model)
        specs["matrix"] = _spec(matrix, "matrix")
        routes.append(Rule("matrix", lambda n, p: id(p) in hidden))
    specs["rest"] = _spec(rest, "rest")
    routes.append(Rule("rest", _always))
    for rule in name_rules:
        if rule.into is not None and rule.into not in specs:
            raise ValueError(f"rule {rule.pattern.pattern!r}: 'into' {rule.into!r}, but that sub-optimizer is not "
                             f"configured (it is None); configured: {', '.join(specs)}")

    claimed: dict[str, list[Tensor]] = {rule.optimizer: [] for rule in routes}
    for n, p in named:
        claimed[_route(routes, n, p)].append(p)
    for rule in name_rules:
        if not claimed[rule.key]:
            warnings.warn(f"optimizer rule {rule.pattern.pattern!r} matches no trainable parameter", stacklevel=2)
    names = {id(p): repr(n) for n, p in named}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    for key, (opt_name, kwargs) in specs.items():
        groups = [{"params": claimed[key]}] if claimed[key] else []
        joined = [r for r in name_rules if r.into == key and claimed[r.key]]
        groups += [{"params": claimed[r.key], **_group_options(opt_name, r)} for r in joined]
        if not groups:
            continue
        _check_geometry(opt_name, groups, get_optimizer(opt_name).cls, names, key)
        optimizers[key] = build_optimizer(opt_name, groups, **kwargs)
    return CompositeOptimizer(optimizers, [Rule(_owner(r.optimizer), r.match) for r in routes])


def _owner(key: str) -> str:
    """``"rest[2]"`` (a group joined by rule 2) belongs to the sub-optimizer ``"rest"``."""
    return key.split("[", 1)[0]


def _group_options(opt_name: str, rule: _NameRule) -> dict[str, Any]:
    valid = get_optimizer(opt_name).keyword_names()
    unknown = sorted(set(rule.overrides) - set(valid))
    if unknown:
        raise ValueError(f"rule {rule.pattern.pattern!r}: optimizer {opt_name!r} has no group option(s) "
                         f"{', '.join(unknown)}; valid: {', '.join(valid)}")
    return _plain(rule.overrides)
