"""safe_norm: drop-in spectral normalisation for PyTorch that is valid from registration.

Change one import::

    from safe_norm import spectral_norm, remove_spectral_norm   # was: from torch.nn.utils import ...
    from safe_norm.parametrizations import spectral_norm        # was: torch.nn.utils.parametrizations

``safe_norm.spectral_norm`` is the function (never a module, unlike ``torch.nn.utils``).
"""

from . import parametrizations
from ._adopt import Guard, convert, guard
from ._errors import DimError, EmptyWeightError, NotATensorError, WeightDtypeError
from ._inspect import Audit, AuditRow, audit, sigma
from ._lazy import initialize_now
from ._spectral_norm import (
    SpectralNorm,
    SpectralNormLoadStateDictPreHook,
    SpectralNormStateDictHook,
    remove_spectral_norm,
    spectral_norm,
)

__version__ = "0.1.0"

__all__ = [
    "spectral_norm",
    "remove_spectral_norm",
    "initialize_now",
    "sigma",
    "audit",
    "Audit",
    "AuditRow",
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
