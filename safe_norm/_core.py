"""What a forward does: the one decision both APIs ask for, judged by the weight's content.

Each normalised weight has a :class:`State`.  At a forward the API hands over its own
:class:`View` of the weight and its vectors, and :func:`forward` decides:

* **Re-converge?**  Until the first training forward the layer is *watching*: if the weight's
  content changed since ``u``, ``v`` were converged for it — by any route: ``nn.init``,
  ``.data`` writes, ``state_dict()`` tensors, ``.to()``, an EMA update — ``u``, ``v`` are
  re-converged (from where they are) before the weight is used, in ``train()`` or ``eval()``.
  The content is compared through ``W v``, the product the forward needs for sigma anyway: it
  is kept bitwise from the last convergence.  Once a training forward has run, the power
  iteration tracks the weight, exactly as upstream.
* **Reuse the normalised weight?**  An eval forward with autograd off on the CPU reuses the
  ``W / σ`` it built last, when ``W v``, ``u`` and ``v`` are bitwise the ones it was built from
  and the cached tensor times ``v`` is bitwise what it was (the tensor is handed out, and
  ``m.weight.data`` can be written).  Otherwise it is rebuilt.  The cache is dropped at the
  first training forward.
* **Run the power step?**  In training, upstream's step, on upstream's vectors.

What defeats the checks: a change of ``W`` (or of the handed-out ``W / σ``) that leaves its
product with ``v`` bitwise equal — below rounding, or orthogonal to ``v`` on purpose.  Under
``torch.compile``, ``torch.func`` transforms and forward-mode AD, and on the meta device,
nothing is checked: upstream's step runs, and a meta weight is converged at its first forward
on a real device.

A load (``load_state_dict``) is not a change: the weight found at the next forward is taken
with the checkpoint's ``u``, ``v``, which are kept exactly.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _power
from ._errors import warn_if_short

__all__ = ["View", "State", "forward", "converge", "take_as_reference", "next_sigma"]

# State.ref: take the W v found at the next forward as the reference, without re-converging
_ADOPT = "adopt"


class View(NamedTuple):
    """One API's view of a normalised weight, as the forward finds it."""

    weight: Tensor  # the tensor divided by its sigma (a parameter, or the parametrization input)
    u: Tensor
    v: Tensor
    dim: int
    eps: float
    n_power_iterations: int
    u_first: bool  # the parametrization API's power step updates u first

    def matrix(self) -> Tensor:
        return _power.weight_to_matrix(self.weight, self.dim)


class _Cached(NamedTuple):
    value: Tensor  # W / sigma
    Wv: Tensor
    u: Tensor
    v: Tensor
    inference: bool
    value_v: Tensor  # value @ v: the handed-out tensor can be written too, through .data


class State:
    """safe_norm's state of one normalised weight, beyond upstream's buffers.

    ``tol`` is the warm-up tolerance (``None``: never re-converge, as upstream).  ``ref`` is
    ``W v`` as it was when ``u``, ``v`` were last converged for the weight; ``None`` means
    "converge at the next forward" (registration on the meta device, an assignment through the
    parametrization).
    """

    __slots__ = ("tol", "watching", "ref", "cache")

    def __init__(self, tol: float | None, *, watching: bool = True) -> None:
        self.tol = tol
        self.watching = watching
        self.ref: Tensor | str | None = None if watching else _ADOPT
        self.cache: _Cached | None = None

    def checks(self) -> bool:
        """Whether the next forward compares the weight with :attr:`ref`."""
        return self.tol is not None and (self.watching or self.ref is None)

    def adopt(self) -> None:
        """A load: the weight at the next forward is the checkpoint's, and so are ``u``, ``v``;
        changes after that are watched again."""
        self.watching, self.ref = True, _ADOPT

    def force(self) -> None:
        """Re-converge at the next forward, even after training has started."""
        self.ref = None

    def stale(self, Wv: Tensor) -> bool:
        """Whether ``u``, ``v`` must be re-converged for the weight whose ``W v`` this is."""
        ref = self.ref
        return ref is None or (isinstance(ref, Tensor) and not _same(ref, Wv))

    # Copies carry the decision (ref), not the cached weight, which is rebuilt when needed.
    def __getstate__(self) -> dict[str, Any]:
        return {"tol": self.tol, "watching": self.watching, "ref": self.ref}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.tol, self.watching, self.ref = state["tol"], state["watching"], state["ref"]
        self.cache = None


def _comparable(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def _same(a: Tensor, b: Tensor) -> bool:
    return _comparable(a, b) and torch.equal(a, b)


def _untracked(weight: Tensor) -> bool:
    """Where content cannot be read or compared: compiled graphs, ``torch.func`` transforms
    (a comparison is data-dependent control flow there) and meta tensors."""
    return torch.compiler.is_compiling() or _power.transformed() or weight.is_meta


def forward(state: State | None, view: View, training: bool) -> Tensor:
    """The normalised weight for this forward (see the module docstring for the rules)."""
    if state is None or _untracked(view.weight):
        if training and state is not None:
            state.watching, state.cache = False, None
        return _normalised(view, training)
    if training:
        if state.checks():
            with torch.no_grad():
                _refresh(state, view, torch.mv(view.matrix().detach(), view.v))
        state.watching, state.cache = False, None
        return _normalised(view, True)
    grad = torch.is_grad_enabled()
    with torch.no_grad():
        Wv = torch.mv(view.matrix().detach(), view.v)
        changed = state.checks() and _refresh(state, view, Wv)
        if changed:
            Wv, state.cache = state.ref, None  # type: ignore[assignment]
    sigma = torch.vdot(view.u, Wv)
    if grad or view.weight.device.type != "cpu" or changed:
        # With a graph there is nothing to reuse; off the CPU the bitwise comparison would
        # synchronise with the device at every forward, for a division that costs less; a
        # weight that just changed (an EMA copy, updated between forwards) is cached from its
        # second forward on.
        return _normalise(view, sigma)
    cached = state.cache
    if (
        cached is not None
        and cached.inference == torch.is_inference_mode_enabled()
        and _same(cached.Wv, Wv)
        and _same(cached.u, view.u)
        and _same(cached.v, view.v)
        and _same(cached.value_v, _times_v(cached.value, view))
    ):
        return cached.value
    value = _normalise(view, sigma)
    state.cache = _Cached(
        value, Wv, view.u.clone(), view.v.clone(), torch.is_inference_mode_enabled(), _times_v(value, view)
    )
    return value


def _times_v(value: Tensor, view: View) -> Tensor:
    return torch.mv(_power.weight_to_matrix(value, view.dim), view.v)


def _refresh(state: State, view: View, Wv: Tensor) -> bool:
    """Re-converge if the weight changed since :attr:`State.ref` (then :attr:`State.ref` is the
    new ``W v``); return whether it did."""
    if isinstance(state.ref, str):  # _ADOPT
        state.ref = Wv
        return False
    if not state.stale(Wv):
        return False
    converge(state, view, Wv)
    return True


@torch.no_grad()
def converge(state: State, view: View, Wv: Tensor | None = None) -> _power.WarmUp:
    """Converge ``u``, ``v`` in place for the weight, and take it as the reference.

    After a small change (``W v``, given or computed, close to the reference) it starts from
    the current vectors and stops within a few steps.  A weight on the meta device is left for
    its first forward on a real device.
    """
    if view.weight.is_meta:
        state.ref = None
        return _power.WarmUp(0, math.inf)
    result = _warm_up(state, view, view.u, view.v, Wv)
    take_as_reference(state, view)
    warn_if_short(result, _tol(state), f"a {tuple(view.weight.shape)} weight")
    return result


def _tol(state: State) -> float:
    return _power.DEFAULT_WARMUP_TOL if state.tol is None else state.tol


#: Relative change of ``W v`` since the last convergence up to which the vectors count as a
#: warm start.  Larger changes can move another singular value above the old top one, and
#: Lanczos from the old top vector then settles below sigma_1 with a bound that does not show
#: it (seen 2.7e-4 low after a half-way lerp to another initialisation).
WARM_CHANGE = 1e-2


def _warm_up(state: State, view: View, u: Tensor, v: Tensor, Wv: Tensor | None = None) -> _power.WarmUp:
    W = view.matrix().detach()
    ref = state.ref
    warm = False
    if isinstance(ref, Tensor):
        Wv = torch.mv(W, v) if Wv is None else Wv
        warm = _comparable(ref, Wv) and bool((Wv - ref).norm() <= WARM_CHANGE * ref.norm())
    steps = _power.WARM_STEPS if warm else 0
    return _power.warm_up_(W, u, v, eps=view.eps, tol=_tol(state), u_first=view.u_first,
                           warm_steps=steps, reconverge=isinstance(ref, Tensor))


@torch.no_grad()
def take_as_reference(state: State, view: View) -> None:
    """``u``, ``v`` belong to the weight as it is now."""
    state.ref = None if view.weight.is_meta else torch.mv(view.matrix().detach(), view.v)


def _normalise(view: View, sigma: Tensor) -> Tensor:
    # The graph (if any) is built on clones: a later power step writes the buffers in place.
    u = view.u.clone(memory_format=torch.contiguous_format)
    v = view.v.clone(memory_format=torch.contiguous_format)
    return _power.normalise(view.weight, u, v, sigma, view.dim)


def _normalised(view: View, training: bool) -> Tensor:
    """Upstream's forward: a power step in training, then ``W / (uᴴ W v)``."""
    W = view.matrix()
    if training:
        sigma = _power.power_iteration_(W, view.u, view.v, view.n_power_iterations, view.eps, u_first=view.u_first)
    else:
        with torch.no_grad():
            sigma = _power.sigma(W, view.u, view.v)
    return _normalise(view, sigma)


@torch.no_grad()
def next_sigma(state: State | None, view: View) -> Tensor:
    """What the next eval forward divides by, computed on copies: no state changes."""
    W = view.matrix().detach()
    u, v = view.u, view.v
    Wv = None if W.is_meta else torch.mv(W, v)
    if state is not None and state.checks() and Wv is not None and state.stale(Wv):
        u, v = u.clone(), v.clone()
        _warm_up(state, view, u, v, Wv)
    return _power.sigma(W, u, v)
