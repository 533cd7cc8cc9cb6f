"""Auditing a checkpoint from its tensors alone (``python -m safe_norm audit PATH``).

Both libraries write the same layout, so the tensors say everything needed: the hook API's
``<name>_orig``, ``<name>_u``, ``<name>_v`` (or upstream's old version-less ``<name>_orig``,
``<name>_u``, ``<name>``), the parametrization API's ``parametrizations.<name>.original`` with
``parametrizations.<name>.<i>._u``, ``._v``.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from . import _power
from ._inspect import _ALIGNED, Audit, cosine, looks_untrained, make_row

__all__ = ["CheckpointError", "load", "tensors", "audit_state_dict"]

_HOOK = re.compile(r"(?:(.*)\.)?([^.]+)_orig")
_PARAMETRIZATION = re.compile(r"(?:(.*)\.)?parametrizations\.([^.]+)\.original")


class CheckpointError(Exception):
    """A checkpoint that cannot be audited; the message is one line for the user."""


def load(path: str, *, unsafe_pickle: bool = False) -> Any:
    """``torch.load`` on CPU, ``weights_only`` unless ``unsafe_pickle``; one-line errors."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    try:
        with warnings.catch_warnings():  # torch's own warnings about odd files: the error says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "Unsupported class" in str(e):  # the latter: torch < 2.4
            raise CheckpointError(
                f"{path}: holds pickled Python objects, which weights_only loading refuses; "
                "pass --unsafe-pickle only if you trust the file (unpickling can run code)"
            ) from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint (corrupt or another format)") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError... on bad files
        detail = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({detail})") from None


def tensors(obj: Any, prefix: str = "") -> dict[str, Tensor]:
    """Every tensor in a (nested) checkpoint, by dotted key: a ``state_dict``, or dicts holding
    them under any keys (``state_dict``, ``model``, ``netD``, ``netG``, ...); whole modules too
    (only from an ``--unsafe-pickle`` load)."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    found: dict[str, Tensor] = {}
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            name = f"{prefix}{key}"
            if isinstance(value, Tensor):
                found[name] = value
            elif isinstance(value, (Mapping, nn.Module)):
                found.update(tensors(value, name + "."))
    return found


def _aligned_dim(weight: Tensor, u: Tensor, v: Tensor | None) -> int | None:
    """The ``dim`` the layer was registered with: the one whose matrix shape matches ``u``,
    ``v``; if several do (a square ``Linear`` or ``ConvTranspose`` with as many inputs as
    outputs), the one whose matrix the vectors are aligned with (they came from power steps on
    it), else 0, the default of every layer but ``ConvTranspose``."""
    h = u.numel()
    fits = [d for d in range(weight.ndim) if weight.shape[d] == h and (v is None or weight.numel() == h * v.numel())]
    if len(fits) <= 1 or v is None:
        return fits[0] if fits else None

    def alignment(d: int) -> float:
        W = _power.weight_to_matrix(weight, d)
        return max(cosine(u, W, v) or 0.0, cosine(v, W.mH, u) or 0.0)

    scores = [alignment(d) for d in fits]
    best = max(range(len(fits)), key=lambda i: (scores[i], -fits[i]))
    return fits[best] if scores[best] >= _ALIGNED else (0 if 0 in fits else fits[0])


@torch.no_grad()
def audit_state_dict(state: Any, *, exact: bool = True) -> Audit:
    """:func:`safe_norm.audit` for a checkpoint: the same rows, from the tensors alone.

    ``library`` is ``None`` (both write the same tensors), ``untrained`` is the hook-API test
    on the vectors, or ``None`` for the parametrization API and the old format, whose state
    cannot tell.

    Example::

        >>> from torch import nn
        >>> import safe_norm
        >>> from safe_norm._checkpoint import audit_state_dict
        >>> sd = {"netD": nn.Sequential(nn.utils.spectral_norm(nn.Linear(8, 16))).state_dict()}
        >>> [(r.module, r.name, r.api, r.untrained) for r in audit_state_dict(sd)]
        [('netD.0', 'weight', 'hook', True)]
    """
    found = tensors(state)
    rows = Audit()
    skipped = []
    for key, weight in found.items():
        hook, param = _HOOK.fullmatch(key), _PARAMETRIZATION.fullmatch(key)
        u: Tensor | None
        v: Tensor | None
        if param:
            path, name = param.group(1) or "", param.group(2)
            group = f"{path}.parametrizations.{name}." if path else f"parametrizations.{name}."
            index = next((i for i in range(16) if f"{group}{i}._u" in found), None)
            if index is None or weight.ndim < 2:
                continue
            u, v = found[f"{group}{index}._u"], found.get(f"{group}{index}._v")
            api, old = "parametrization", False
        elif hook:
            path, name = hook.group(1) or "", hook.group(2)
            base = f"{path}.{name}" if path else name
            u, v = found.get(base + "_u"), found.get(base + "_v")
            old = v is None and isinstance(found.get(base), Tensor)
            api = "hook"
        else:
            continue
        if u is None or u.ndim != 1 or (v is None and not old):
            continue
        dim = _aligned_dim(weight, u, v)
        if dim is None:  # vectors of a map, not of the reshaped weight: its geometry is not saved
            skipped.append(key)
            continue
        W = _power.weight_to_matrix(weight.detach(), dim)
        if old:  # upstream's load hook takes sigma = mean(weight_orig / weight)
            used = (weight / found[base]).mean()
            untrained = None
        else:
            assert v is not None
            used = _power.sigma(W.to(u.dtype), u, v).real
            untrained = looks_untrained(W, u, v) if api == "hook" else None
        rows.append(make_row(path, name, api, None, weight, dim, used, untrained, exact))
    if skipped:
        warnings.warn("audit: left out (their u, v do not fit the reshaped weight: layers built with "
                      "input_shape, or another library's convolution-shaped copies, whose input shape a "
                      f"checkpoint does not hold): {', '.join(skipped)}", stacklevel=2)
    return rows
