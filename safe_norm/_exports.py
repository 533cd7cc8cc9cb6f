"""The rest of upstream's namespaces: ``safe_norm`` stands for ``torch.nn.utils`` and
``safe_norm.parametrizations`` for ``torch.nn.utils.parametrizations``, so that changing the
module name in a real import line (``from torch.nn.utils import weight_norm,
remove_weight_norm, spectral_norm``) is enough.

A name the module does not define itself is looked up in upstream's module when it is asked
for (PEP 562), not copied at import: it is upstream's own object, monkeypatches included, and
names a newer torch adds come along.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any


def lookup(name: str, upstream: ModuleType, attr: str) -> Any:
    """Module ``name``'s ``__getattr__``: ``attr``, which it does not define, from ``upstream``.

    Install it after the module's own submodules and names exist: ``from . import x`` asks
    ``hasattr(package, "x")`` first, and would otherwise be handed upstream's ``x``.
    """
    # Public names only: dunders (__path__, __file__, __wrapped__) and private names stay the
    # module's own, so importlib, pickle, inspect and doctest see this module as it is.
    if not attr.startswith("_"):
        try:
            return getattr(upstream, attr)
        except AttributeError:
            pass
        # A submodule not imported yet (torch.nn.utils.prune): upstream's
        # `from torch.nn.utils import prune` imports it, so the swapped line does too.
        if hasattr(upstream, "__path__"):
            full = f"{upstream.__name__}.{attr}"
            try:
                return importlib.import_module(full)
            except ModuleNotFoundError as e:
                if e.name != full:
                    raise  # it exists, and its own import failed: that error, not ours
    raise AttributeError(f"module {name!r} has no attribute {attr!r}", name=attr, obj=sys.modules[name])


def names(name: str, upstream: ModuleType) -> list[str]:
    """Module ``name``'s ``__dir__``: its own names and upstream's public ones."""
    return sorted(set(vars(sys.modules[name])) | {a for a in dir(upstream) if not a.startswith("_")})


def others(own: list[str], upstream: ModuleType) -> list[str]:
    """What ``__all__`` adds to the module's own public names: upstream's others, so that
    ``from safe_norm import *`` stands in for ``from torch.nn.utils import *`` too (with
    safe_norm's spectral norm in place of upstream's)."""
    names = getattr(upstream, "__all__", None)
    if names is None:  # torch 2.1's torch.nn.utils has none: its star import takes every public name
        names = [a for a in vars(upstream) if not a.startswith("_")]
    return [a for a in names if a not in own]
