"""What a forward does: the one decision both APIs ask for, judged by the weight's content.

Each normalised weight has a :class:`State`.  At a forward the API hands over its own
:class:`View` of the weight and its vectors, and :func:`forward` decides:

* **Re-converge?**  Until the first training forward the layer is *watching*: if the weight's
  content changed since ``u``, ``v`` were converged for it — by any route: ``nn.init``,
  ``.data`` writes, ``state_dict()`` tensors, ``.to()``, an EMA update — ``u``, ``v`` are
  re-converged (from where they are, after a small change) before the weight is used, in
  ``train()`` or ``eval()``.  The content is compared through ``W r``, the product with a fixed
  dense probe vector ``r``, and the vectors themselves, kept bitwise from the last convergence
  (the vectors too: ``torch.func.functional_call`` with other buffers converges those, and the
  layer's own must not then pass as converged).  ``state_dict()`` settles a pending
  re-convergence first, so a checkpoint holds the vectors the next forward would use.  Once a
  training forward has run, the power iteration tracks the weight, exactly as upstream.
* **Reuse the normalised weight?**  An eval forward with autograd off on the CPU reuses the
  ``W / σ`` it built last, when ``W r``, ``u`` and ``v`` are bitwise the ones it was built from
  and the cached tensor times ``r`` is bitwise what it was (the tensor is handed out, and
  ``m.weight.data`` can be written).  Otherwise it is rebuilt.  The cache is dropped at the
  first training forward.
* **Run the power step?**  In training, upstream's step, on upstream's vectors.

What defeats the checks: a change of ``W`` (or of the handed-out ``W / σ``) that leaves its
product with ``r`` bitwise equal — below the rounding of that product, or built on purpose
orthogonal to ``r``.  (``v`` itself would not do as the probe: it has exact zeros wherever a
column of ``W`` is zero, and a write there would go unseen.)  Under ``torch.compile``,
``torch.jit.trace``, ``torch.func`` transforms and forward-mode AD, and on the meta device,
nothing is checked: upstream's step runs, and a meta weight is converged at its first forward
on a real device.

A load (``load_state_dict``) of a checkpoint that holds the layer is not a change: the weight
found at the next forward is taken with the checkpoint's ``u``, ``v``, which are kept exactly.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _compat, _krylov, _power
from ._errors import warn_if_short

__all__ = ["View", "State", "forward", "converge", "watch", "settle", "next_sigma"]

# State.ref: take the content found at the next forward as the reference, without re-converging
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
    coeff: float | None = None  # soft normalisation: divide by max(1, sigma / coeff)
    op: Any = None  # a ConvMap: sigma is the layer's norm as a map on inputs of its shape

    def matrix(self) -> Tensor:
        """The reshaped weight: what the content checks read (and sigma's matrix, without op)."""
        return _power.weight_to_matrix(self.weight, self.dim)

    def linear(self, matrix: Tensor | None = None) -> Tensor | _power.Map:
        """What sigma is the norm of: the reshaped weight (``matrix``, where the caller has it),
        or the operator with the weight (detached where that ``matrix`` is)."""
        if self.op is None:
            return self.matrix() if matrix is None else matrix
        detached = matrix is not None and not matrix.requires_grad
        return _power.Map(self.op, self.weight.detach() if detached else self.weight)


class _Cached(NamedTuple):
    value: Tensor  # W / sigma
    key: Tensor  # W r, u, v it was built from (see _key)
    inference: bool
    value_r: Tensor  # value @ r: the handed-out tensor can be written too, through .data


class State:
    """safe_norm's state of one normalised weight, beyond upstream's buffers.

    ``tol`` is the warm-up tolerance (``None``: never re-converge, as upstream).  ``ref`` is
    the :func:`_key` (``W r``, ``u``, ``v``) as it was when ``u``, ``v`` were last converged for
    the weight; ``None`` means
    "converge at the next forward" (registration on the meta device, an assignment through the
    parametrization).  ``label`` names the weight in warnings.
    """

    __slots__ = ("tol", "watching", "ref", "label", "probe", "cache", "track", "blocks", "basis")

    def __init__(
        self, tol: float | None, *, watching: bool = True, label: str = "", track: float | None = None
    ) -> None:
        self.tol = tol
        self.watching = watching
        self.ref: Tensor | str | None = None if watching else _ADOPT
        self.label = label
        self.probe: Tensor | None = None
        self.cache: _Cached | None = None
        self.track = track  # track_tol: sigma kept within it at every training forward
        self.blocks = 1  # Krylov blocks before a tracked step's check (at least _krylov.MIN_CHECK)
        self.basis: dict[torch.device, Tensor] = {}  # kept Ritz vectors (see _krylov.track_)

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

    def stale(self, key: Tensor) -> bool:
        """Whether ``u``, ``v`` must be re-converged: the :func:`_key` of the weight and vectors
        found is not the one they were converged as."""
        ref = self.ref
        return ref is None or (isinstance(ref, Tensor) and not _same(ref, key))

    def content(self, W: Tensor) -> Tensor:
        """``W r``, with the probe ``r`` made for ``W``'s width, dtype and device: a fixed-seed
        dense vector (the caller's random stream is left as it is)."""
        r = self.probe
        if r is None or r.shape[0] != W.shape[1] or r.dtype != W.dtype or r.device != W.device:
            r = self.probe = _krylov.fixed_draw(W.shape[1], like=W)
        if _compat.autocast_enabled(W.device.type):
            # in the weight's dtype, as outside autocast: the same weight gives the same product
            with torch.autocast(W.device.type, enabled=False):
                return torch.mv(W, r)
        return torch.mv(W, r)

    # Copies carry the decisions (ref, track), not the cached weight or the tracking's working
    # vectors, which are rebuilt when needed.
    def __getstate__(self) -> dict[str, Any]:
        return {"tol": self.tol, "watching": self.watching, "ref": self.ref, "label": self.label,
                "track": self.track}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.tol, self.watching, self.ref = state["tol"], state["watching"], state["ref"]
        self.label, self.probe, self.cache = state["label"], None, None
        self.track, self.blocks, self.basis = state.get("track"), 1, {}


def _key(Wr: Tensor, view: View) -> Tensor:
    """What the checks compare, as one tensor (one comparison, one device synchronisation):
    the weight's content ``W r`` and the vectors."""
    return torch.cat([Wr, view.u, view.v])


def _comparable(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def _same(a: Tensor, b: Tensor) -> bool:
    return _comparable(a, b) and torch.equal(a, b)


def _untracked(weight: Tensor) -> bool:
    """Where content cannot be read or compared: compiled, traced and exported graphs (a
    comparison would be baked in, or cannot be answered on fake tensors), ``torch.func``
    transforms (it is data-dependent control flow there) and meta tensors."""
    return (
        _compat.is_compiling()
        or torch.jit.is_tracing()
        or _power.transformed()
        or weight.is_meta
        or _compat.is_fake(weight)
    )


def forward(state: State | None, view: View, training: bool) -> Tensor:
    """The normalised weight for this forward (see the module docstring for the rules)."""
    if not _compat.is_compiling() and _compat.is_sharded(view.weight):
        # read outside FSDP2's forward (``module.weight`` of the parametrization API): the
        # whole weight, gathered from every rank, normalised as a plain tensor
        view = view._replace(weight=_compat.gathered(view.weight))
    if state is None or _untracked(view.weight):
        if training and state is not None:
            state.watching, state.cache = False, None
        return _normalised(view, training)
    if training:
        if state.checks():
            with torch.no_grad():
                _refresh(state, view, state.content(view.matrix().detach()))
        state.watching, state.cache = False, None
        if state.track is not None:
            return _tracked(state, view)
        return _normalised(view, True)
    W = view.matrix().detach()
    # With a graph there is nothing to reuse; off the CPU the bitwise comparison would
    # synchronise with the device at every forward, for a division that costs less.
    graph = torch.is_grad_enabled()
    cacheable = not graph and W.device.type == "cpu"
    if not cacheable:
        state.cache = None
    with torch.no_grad():
        Wr = state.content(W) if cacheable or state.checks() else None
        if Wr is not None and state.checks() and _refresh(state, view, Wr):
            # A weight that just changed (an EMA copy, updated between forwards) is cached
            # from its next forward on.
            cacheable, state.cache = False, None
        key = _key(Wr, view) if cacheable else None  # type: ignore[arg-type]
        cached = state.cache
        if (
            cacheable
            and cached is not None
            and cached.inference == torch.is_inference_mode_enabled()
            and _same(cached.key, key)  # type: ignore[arg-type]
            and _same(cached.value_r, _times_probe(state, cached.value, view))
        ):
            return cached.value
        # with a graph, or where it divides by its own (input_shape, complex), normalise
        # computes sigma itself
        sigma = None if graph or not _power.takes_sigma(view.weight, view.op) else _power.sigma(W, view.u, view.v)
    value = _normalise(view, sigma)
    if cacheable:
        state.cache = _Cached(value, key,  # type: ignore[arg-type]
                              torch.is_inference_mode_enabled(), _times_probe(state, value, view))
    return value


def _times_probe(state: State, value: Tensor, view: View) -> Tensor:
    return state.content(_power.weight_to_matrix(value, view.dim))


def _refresh(state: State, view: View, Wr: Tensor) -> bool:
    """Re-converge if the weight changed since :attr:`State.ref`; return whether it did."""
    key = _key(Wr, view)
    if isinstance(state.ref, str):  # _ADOPT
        state.ref = key
        return False
    if not state.stale(key):
        return False
    converge(state, view, Wr)
    return True


@torch.no_grad()
def converge(state: State, view: View, Wr: Tensor | None = None) -> _krylov.WarmUp:
    """Converge ``u``, ``v`` in place for the weight, and take it as the reference.

    After a small change (``W r``, given or computed, close to the reference) it starts from
    the current vectors and stops within a few steps.  A weight on the meta device is left for
    its first forward on a real device.
    """
    if view.weight.is_meta:
        state.ref = None
        return _krylov.WarmUp(0, math.inf)
    W = view.matrix().detach()
    Wr = state.content(W) if Wr is None else Wr
    result = _warm_up(state, view, view.u, view.v, Wr)
    state.ref = _key(Wr, view)  # the vectors as the warm-up left them
    # A block solve's Ritz vectors: where the first tracked step starts.  Not from a square map
    # warmed up the parametrization API's way round (on its adjoint): they would be left vectors.
    square = view.op is not None and view.op.shape[0] == view.op.shape[1]
    if result.basis is not None and state.track is not None and not (view.u_first and square):
        state.basis[view.u.device] = result.basis
    warn_if_short(result, _tol(state), state.label or f"a {tuple(view.weight.shape)} weight")
    return result


def _tol(state: State) -> float:
    return _krylov.DEFAULT_WARMUP_TOL if state.tol is None else state.tol


def _warm_up(state: State, view: View, u: Tensor, v: Tensor, Wr: Tensor) -> _krylov.WarmUp:
    ref = state.ref
    warm = False
    h = Wr.numel()
    if isinstance(ref, Tensor) and ref.shape == (h + u.numel() + v.numel(),):
        # A warm start: the vectors are the ones converged for a nearby weight (a move or a
        # dtype change is a small change too)
        ref = ref.to(Wr)
        warm = bool(torch.equal(ref[h:], torch.cat([u, v]).to(Wr))
                    and (Wr - ref[:h]).norm() <= _krylov.WARM_CHANGE * ref[:h].norm())
    steps = _krylov.WARM_STEPS if warm else 0
    return _krylov.warm_up_(view.linear().detach(), u, v, tol=_tol(state), u_first=view.u_first,
                           warm_steps=steps, reconverge=isinstance(ref, Tensor))


def _normalise(view: View, sigma: Tensor | None, fused: bool | None = None) -> Tensor:
    # The graph (if any) is built on clones: a later power step writes the buffers in place.
    u = view.u.clone(memory_format=torch.contiguous_format)
    v = view.v.clone(memory_format=torch.contiguous_format)
    return _power.normalise(view.weight, u, v, sigma, view.dim, view.coeff, view.op, fused)


def _normalised(view: View, training: bool) -> Tensor:
    """Upstream's forward: a power step in training, then ``W / (uᴴ W v)``."""
    sigma = None  # in eval, normalise computes it where it needs it (once, with its graph or not)
    fused = _power.takes_sigma(view.weight, view.op)
    if training:
        sigma = _power.power_iteration_(
            view.linear(), view.u, view.v, view.n_power_iterations, view.eps, u_first=view.u_first,
            estimate=fused,
        )
    return _normalise(view, sigma, fused)


def _tracked(state: State, view: View) -> Tensor:
    """A training forward with ``track_tol``: sigma within it of the weight's, by block
    Krylov from the current vectors (:func:`safe_norm._krylov.track_`).  Where that cannot vouch
    for its result (a large jump of the weight, a degenerate top of the spectrum), the
    warm-up's solve from the vectors it found; a warning each time that misses too."""
    tol = state.track
    assert tol is not None
    device = view.u.device  # DataParallel replicas share this state: one basis per device
    A = view.linear()
    found = _krylov.track_(A, view.u, view.v, tol, blocks=state.blocks, basis=state.basis.get(device))
    if found is None:  # a zero or non-finite weight: upstream's step (it keeps the vectors)
        return _normalised(view, True)
    state.blocks = found.next_check
    if found.basis is not None:
        state.basis[device] = found.basis
    sigma = found.sigma
    if not found.met:
        with torch.no_grad():
            solved = _krylov.warm_up_(A.detach(), view.u, view.v, tol=tol,
                                     u_first=view.u_first, reconverge=True)
            sigma = _power.sigma(A.detach(), view.u, view.v)
        if solved.error_estimate > tol:
            warnings.warn(f"spectral_norm tracking of {state.label or 'a weight'}: sigma estimated "
                          f"within {solved.error_estimate:.1e} only (asked: {tol:.0e})", stacklevel=4)
    return _normalise(view, sigma)


@torch.no_grad()
def watch(state: State, view: View) -> None:
    """Watch the weight from now on, with ``u``, ``v`` as they are taken as converged for it
    (a training forward at registration ran a power step after converging them); converged
    first if pending (no forward at registration, or a meta weight)."""
    state.watching = True
    if state.ref is None:
        converge(state, view)
    elif isinstance(state.ref, Tensor) and not view.weight.is_meta:
        state.ref = _key(state.content(view.matrix().detach()), view)


def settle(state: State | None, view: View) -> None:
    """Re-converge now if the next forward would (a ``state_dict()`` is about to be taken):
    a checkpoint then holds vectors converged for the weight it holds, and its load, which
    keeps them exactly, divides by the same sigma as the original would.

    Not on a sharded weight (FSDP2's between forwards): reading it whole is a collective, which
    a ``state_dict()`` taken on one rank would wait on forever.  The vectors are saved as they
    are; where they are known not to be converged (registered on the meta device, or the
    weight assigned, and no forward since), a warning says so."""
    if state is None or not state.checks() or _untracked(view.weight):
        return
    if _compat.is_sharded(view.weight):
        if state.ref is None:
            warnings.warn(f"state_dict of {state.label or 'a sharded weight'}: its u, v are not converged for "
                          "the weight (no forward since it was registered or assigned), and a sharded weight is "
                          "not gathered here: the checkpoint holds them as they are. Run one forward first.",
                          stacklevel=3)
        return
    with torch.no_grad():
        _refresh(state, view, state.content(view.matrix().detach()))


@torch.no_grad()
def next_sigma(state: State | None, view: View) -> Tensor:
    """What the next eval forward divides by, computed on copies: no state changes."""
    W = view.matrix().detach()
    u, v = view.u, view.v
    if state is not None and state.checks() and not W.is_meta:
        Wr = state.content(W)
        if state.stale(_key(Wr, view)):
            u, v = u.clone(), v.clone()
            _warm_up(state, view, u, v, Wr)
    return _power.sigma(view.linear(W), u, v)
