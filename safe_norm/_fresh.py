"""The "never stale" rule: when ``u``, ``v`` must be re-converged for the weight.

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

from torch import Tensor

__all__ = ["Freshness"]

_ADOPT = "adopt"  # take the weight's next stamp as the reference, without re-converging
_FORCE = "force"  # re-converge at the next forward, even after training has started


def _stamp(weight: Tensor) -> tuple[int, int]:
    return weight.data_ptr(), weight._version


class Freshness:
    """State of one normalised weight under the rule above (plain Python, cheap to check)."""

    __slots__ = ("armed", "stamp")

    def __init__(self, *, armed: bool = False, force: bool = False) -> None:
        self.armed = armed
        self.stamp: tuple[int, int] | str = _FORCE if force else _ADOPT

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
        elif self.stamp is _ADOPT:
            self.stamp, stale = _stamp(weight), False
        else:
            stale = _stamp(weight) != self.stamp
        if training:
            self.armed = False
        return stale

    def converged(self, weight: Tensor) -> None:
        """``u``, ``v`` now belong to ``weight`` as it is."""
        self.stamp = _stamp(weight)

    def arm(self) -> None:
        """Watch for changes again (after registration or a load)."""
        self.armed = True

    def adopt(self) -> None:
        """A load: the weight at the next forward is the checkpoint's, and so are ``u``, ``v``."""
        self.armed, self.stamp = True, _ADOPT

    def force(self) -> None:
        self.stamp = _FORCE
