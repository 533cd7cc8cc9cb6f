"""Tracking tensor state: the "never stale" rule, and the eval cache of the normalised weight.

The "never stale" rule says when ``u``, ``v`` must be re-converged for the weight.

Both APIs keep one :class:`Freshness` per normalised weight.  The rule:

* A weight that changes outside training — after registration, a load, or a re-convergence,
  and before the next training forward (``net.apply(init_fn)``, ``nn.init.*``, ``copy_``,
  ``.to(...)``) — gets ``u``, ``v`` re-converged at the next forward, in ``train()`` or
  ``eval()``.  A change is seen through the tensor's version counter and storage pointer.
* Once a training forward has run, nothing is checked any more: the module behaves exactly as
  upstream (optimizer steps change the weight by design; the power iteration tracks it).
* ``load_state_dict`` is not a change: the weight as the next forward finds it is taken as the
  checkpoint's, with the checkpoint's ``u``, ``v``.
* An explicit request (:meth:`force`, e.g. an assignment through the parametrization) is
  honoured at the next forward whatever the state.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

__all__ = ["Freshness", "EvalCache", "Stamp"]


class Stamp:
    """A tensor's identity, storage and version counter: a tensor that still matches its stamp
    has not been written, moved or replaced since (writes through ``.data`` excepted)."""

    __slots__ = ("ref", "ptr", "version")

    def __init__(self, tensor: Tensor) -> None:
        self.ref = weakref.ref(tensor)
        self.ptr = tensor.data_ptr()
        self.version = tensor._version

    def matches(self, tensor: Tensor) -> bool:
        return self.ref() is tensor and self.ptr == tensor.data_ptr() and self.version == tensor._version


_ADOPT = "adopt"  # take the weight's next stamp as the reference, without re-converging
_FORCE = "force"  # re-converge at the next forward, even after training has started


class Freshness:
    """State of one normalised weight under the rule above (plain Python, cheap to check)."""

    __slots__ = ("armed", "stamp")

    def __init__(self, *, armed: bool = False, force: bool = False) -> None:
        self.armed = armed
        self.stamp: Stamp | str = _FORCE if force else _ADOPT

    # Stamps hold weak references, which neither pickle nor deep-copy meaningfully: a copy
    # takes the weights it finds at its next forward as its own, like a load.
    def __getstate__(self) -> dict[str, Any]:
        return {"armed": self.armed, "stamp": self.stamp if isinstance(self.stamp, str) else _ADOPT}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.armed, self.stamp = state["armed"], state["stamp"]

    @property
    def watching(self) -> bool:
        """False once training runs: the per-forward cost is then this one check."""
        return self.armed or self.stamp is _FORCE

    def needs_warm_up(self, weight: Tensor, training: bool) -> bool:
        """Called at a forward while :attr:`watching`, before the weight is used."""
        if self.stamp is _FORCE:
            stale = True
        elif not self.armed:
            return False
        elif isinstance(self.stamp, Stamp):
            stale = not self.stamp.matches(weight)
        else:  # _ADOPT
            self.stamp, stale = Stamp(weight), False
        if training:
            self.armed = False
        return stale

    def stale(self, weight: Tensor) -> bool:
        """Whether the next forward will re-converge ``u``, ``v`` for ``weight`` (no state change)."""
        if self.stamp is _FORCE:
            return True
        return self.armed and isinstance(self.stamp, Stamp) and not self.stamp.matches(weight)

    def converged(self, weight: Tensor) -> None:
        """``u``, ``v`` now belong to ``weight`` as it is."""
        self.stamp = Stamp(weight)

    def arm(self) -> None:
        """Watch for changes again (after registration or a load)."""
        self.armed = True

    def adopt(self) -> None:
        """A load: the weight at the next forward is the checkpoint's, and so are ``u``, ``v``."""
        self.armed, self.stamp = True, _ADOPT

    def force(self) -> None:
        self.stamp = _FORCE


class EvalCache:
    """The normalised weight of the last graph-free eval forward, reused while the weight,
    ``u`` and ``v`` are unchanged (upstream recomputes it at every forward).

    Only used with autograd off (``torch.no_grad()``, ``inference_mode()``) and out of training;
    with grad enabled the graph is built as usual.  Not copied or pickled.
    """

    __slots__ = ("stamps", "value_stamp", "inference", "value")

    def __init__(self) -> None:
        self.stamps: tuple[Stamp, ...] = ()
        self.value_stamp: Stamp | None = None
        self.inference = False
        self.value: Tensor | None = None

    @staticmethod
    def applies(training: bool, weight: Tensor) -> bool:
        return not training and not torch.is_grad_enabled() and not weight.is_inference()

    def get(self, *tensors: Tensor) -> Tensor | None:
        value = self.value
        if (
            value is not None
            and self.inference == torch.is_inference_mode_enabled()
            and len(self.stamps) == len(tensors)
            and all(s.matches(t) for s, t in zip(self.stamps, tensors))
            and (self.value_stamp is None or self.value_stamp.matches(value))
        ):
            return value
        return None

    def put(self, value: Tensor, *tensors: Tensor) -> Tensor:
        self.stamps = tuple(Stamp(t) for t in tensors)
        # The value is stamped too: a user's in-place edit of it is undone at the next forward,
        # as upstream's recomputation would (inference tensors have no version counter).
        self.value_stamp = None if value.is_inference() else Stamp(value)
        self.inference = torch.is_inference_mode_enabled()
        self.value = value
        return value

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def __deepcopy__(self, memo: dict[int, Any]) -> EvalCache:
        return EvalCache()
