"""The reference upstream patch (``python -m safe_norm upstream-patch``): the smallest change to
``torch/nn/utils/spectral_norm.py`` that fixes PyTorch issue #51800, in upstream's own style.

It is generated against the installed torch's file, read at run time, so this repository holds
only the lines the patch adds.  It warms ``u`` and ``v`` up at registration with upstream's own
power step, until sigma settles (relative change ≤ 1e-6, at most 500 steps: 70–170 steps on
default-initialised layers up to 512 wide, sigma within ~3e-5).  safe_norm itself uses a Lanczos
warm-up (fewer mat-vecs, a stated tolerance); that is an optimisation for a later PR, not needed
for the fix.  Nothing else changes: the random draws, the state-dict format, the training step.
"""

from __future__ import annotations

import difflib
import importlib.util
import re

__all__ = ["UPSTREAM_FILE", "upstream_patch", "upstream_source_path"]

UPSTREAM_FILE = "torch/nn/utils/spectral_norm.py"

# The last line of upstream's random initialisation in SpectralNorm.apply (torch 1.x-2.x).
_ANCHOR = re.compile(r"(?P<indent>\s*)v = (?P<ns>F\.)?normalize\(weight\.new_empty\(w\)\.normal_\(0, 1\), dim=0, eps=fn\.eps\)\n")

_WARM_UP = """\
# Converge `u` and `v` now: an eval() forward before the first training
# forward runs no power iteration, and would divide the weight by
# `u^T W v` of the random vectors above (gh-51800). Iterate until sigma
# settles; the same power step as in `compute_weight`.
sigma = torch.dot(u, torch.mv(weight_mat, v))
for _ in range(500):
    v = {ns}normalize(torch.mv(weight_mat.t(), u), dim=0, eps=fn.eps, out=v)
    u = {ns}normalize(torch.mv(weight_mat, v), dim=0, eps=fn.eps, out=u)
    last, sigma = sigma, torch.dot(u, torch.mv(weight_mat, v))
    if abs(sigma - last) <= 1e-6 * abs(sigma):
        break
"""


def upstream_source_path() -> str:
    spec = importlib.util.find_spec("torch.nn.utils.spectral_norm")
    if spec is None or spec.origin is None:
        raise RuntimeError("cannot find torch/nn/utils/spectral_norm.py in the installed torch")
    return spec.origin


def upstream_patch(source: str | None = None) -> str:
    """A unified diff (``git apply`` / ``patch -p1`` in a PyTorch checkout) against ``source``,
    by default the installed torch's ``spectral_norm.py``.

    Example::

        >>> from safe_norm._patch import upstream_patch
        >>> patch = upstream_patch()
        >>> patch.splitlines()[:2]
        ['--- a/torch/nn/utils/spectral_norm.py', '+++ b/torch/nn/utils/spectral_norm.py']
    """
    if source is None:
        with open(upstream_source_path(), encoding="utf-8") as f:
            source = f.read()
    lines = source.splitlines(keepends=True)
    for i, line in enumerate(lines):
        match = _ANCHOR.fullmatch(line)
        if match:
            break
    else:
        raise RuntimeError(
            f"{UPSTREAM_FILE}: the random initialisation of `u`, `v` in SpectralNorm.apply was not "
            "found; this torch's file differs from the versions the patch is written for"
        )
    indent, ns = match["indent"], match["ns"] or ""
    added = [indent + text + "\n" if text else "\n" for text in _WARM_UP.format(ns=ns).splitlines()]
    patched = lines[: i + 1] + added + lines[i + 1 :]
    return "".join(difflib.unified_diff(lines, patched, "a/" + UPSTREAM_FILE, "b/" + UPSTREAM_FILE))
