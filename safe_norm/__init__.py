"""safe_norm: drop-in spectral normalisation for PyTorch that is valid from registration.

Change one import::

    from safe_norm import spectral_norm, remove_spectral_norm   # was: from torch.nn.utils import ...
    from safe_norm.parametrizations import spectral_norm        # was: torch.nn.utils.parametrizations

``safe_norm.spectral_norm`` is the function (never a module, unlike ``torch.nn.utils``).
Every other public name of ``torch.nn.utils`` (``weight_norm``, ``remove_weight_norm``,
``clip_grad_norm_``, ``parametrize``, ...) is upstream's own object, forwarded, so that real
import lines such as ``from torch.nn.utils import weight_norm, remove_weight_norm,
spectral_norm`` need only the module name changed.
"""

from typing import Any as _Any

import torch.nn.utils as _upstream

from . import _exports, parametrizations
from ._adopt import Guard, convert, guard
from ._errors import DimError, EmptyWeightError, NotATensorError, WeightDtypeError
from ._inspect import Audit, AuditRow, audit, sigma
from ._lazy import initialize_now
from ._operator import OperatorNorm, operator_norm
from ._spectral_norm import (
    SpectralNorm,
    SpectralNormLoadStateDictPreHook,
    SpectralNormStateDictHook,
    remove_spectral_norm,
    spectral_norm,
)

__version__ = "0.1.0"

# safe_norm's own names, then torch.nn.utils's others (its __all__, from the installed torch):
# `from safe_norm import *` then stands in for `from torch.nn.utils import *` as well.
__all__ = [
    "spectral_norm",
    "remove_spectral_norm",
    "initialize_now",
    "sigma",
    "audit",
    "Audit",
    "AuditRow",
    "operator_norm",
    "OperatorNorm",
    "guard",
    "Guard",
    "convert",
    "parametrizations",
    "SpectralNorm",
    "SpectralNormLoadStateDictPreHook",
    "SpectralNormStateDictHook",
    "NotATensorError",
    "WeightDtypeError",
    "DimError",
    "EmptyWeightError",
]
__all__ += _exports.others(__all__, _upstream)


# Last, once this package's own submodules are imported (see _exports.lookup).
def __getattr__(attr: str) -> _Any:
    return _exports.lookup(__name__, _upstream, attr)


def __dir__() -> list[str]:
    return _exports.names(__name__, _upstream)
