"""The reference patch series for PyTorch (``python -m safe_norm upstream-patch``).

Three patches in upstream's style, generated at run time from the files they change, so this
repository holds only the lines the series adds:

1. ``torch/nn/utils/spectral_norm.py``: the hook API runs the parametrization API's 15 power
   iterations at registration (PyTorch issue #51800: an ``eval()`` forward before the first
   training forward divided the weight by ``uᵀWv`` of random vectors).
2. Both APIs: the warm-up converges ``u``, ``v`` to a stated tolerance (relative 1e-4 on
   sigma) by Golub–Kahan–Lanczos with an error bound, in at most 100 steps and one host
   synchronisation per 10 steps, none per product. The random draws, the state-dict format
   and the training step are unchanged.
3. Regression tests in ``test/test_nn.py`` (``TestNN``) and ``test/nn/test_parametrization.py``
   (``TestNNParametrization``), and the one upstream assertion that a converged warm-up
   contradicts. Generated only from a PyTorch source tree (the installed torch has no tests).

The source patches are generated from the installed torch by default, or from another root
holding ``torch/nn/utils/`` (``--torch-root``: a PyTorch checkout), each from the file as the
previous patch left it; ``--tree`` names the checkout whose ``test/`` the test patch is for.
``scripts/verify_upstream_patch.py`` applies the series and runs PyTorch's own tests.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
from types import ModuleType
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["HOOK_FILE", "PARAM_FILE", "TEST_NN", "TEST_PARAM", "Patch", "series", "format_series",
           "write_series", "upstream_patch", "upstream_source_path", "installed_torch_root", "load_patched"]

HOOK_FILE = "torch/nn/utils/spectral_norm.py"
PARAM_FILE = "torch/nn/utils/parametrizations.py"
TEST_NN = "test/test_nn.py"
TEST_PARAM = "test/nn/test_parametrization.py"

# The last line of upstream's random initialisation in SpectralNorm.apply (torch 1.x-2.x).
_ANCHOR = re.compile(r"(?P<indent>\s*)v = (?P<ns>F\.)?normalize\(weight\.new_empty\(w\)\.normal_\(0, 1\), dim=0, eps=fn\.eps\)\n")

_FIXED_WARM_UP = """\
# Start with u, v initialized to some reasonable values by performing a
# number of iterations of the power method, as the parametrization does:
# an eval() forward before the first training forward runs no power
# iteration, and would divide the weight by `u^T W v` of the random
# vectors above.
for _ in range(15):
    v = {ns}normalize(torch.mv(weight_mat.t(), u), dim=0, eps=fn.eps, out=v)
    u = {ns}normalize(torch.mv(weight_mat, v), dim=0, eps=fn.eps, out=u)
"""

_CONVERGED_WARM_UP = """\
# Start with u, v converged, so that sigma is right before the first
# training forward: an eval() forward runs no power iteration.
_converge_singular_vectors(weight_mat, u, v, fn.eps)
"""

_PARAM_WARM_UP = re.compile(
    r"(?P<indent>[ ]*)# Start with u, v initialized to some reasonable values by performing a number\n"
    r"[ ]*# of iterations of the power method\n"
    r"[ ]*self\._power_method\(weight_mat, 15\)\n")

_PARAM_CONVERGED = """\
# Start with u, v converged to the top singular vectors, so that sigma is
# right before the first training forward
_converge_singular_vectors(weight_mat, self._u, self._v, self.eps)
"""

_HELPER = '''\
def _converge_singular_vectors(
    weight_mat: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    eps: float,
    tol: float = 1e-4,
    max_steps: int = 100,
    check_every: int = 10,
) -> None:
    r"""Overwrite ``u`` and ``v`` in place with the top left and right singular
    vectors of ``weight_mat``, so that ``u^H W v`` is within a relative ``tol`` of
    its spectral norm.

    The top singular values of a freshly initialized layer lie close together,
    and the power method needs hundreds of iterations there. Golub-Kahan-Lanczos
    bidiagonalization with full reorthogonalization, started from ``v`` (or
    ``u``, whichever is shorter), needs a few dozen matrix-vector products. Its
    error bound is read every ``check_every`` steps: one host synchronization
    per check, none per product.
    """
    if weight_mat.is_meta:
        return
    with torch.no_grad():
        A = weight_mat.to(torch.promote_types(weight_mat.dtype, torch.float32))
        # Iterate in the smaller of the two spaces: its dimension in steps spans it all.
        transposed = A.size(0) < A.size(1)
        if transposed:
            A = A.mH
        n = min(A.size(1), max_steps)
        U = A.new_zeros(n, A.size(0))
        V = A.new_zeros(n + 1, A.size(1))
        alpha = A.new_zeros(n, dtype=A.real.dtype)
        beta = A.new_zeros(n, dtype=A.real.dtype)
        start = u if transposed else v
        V[0] = start / start.norm().clamp_min(eps)
        k, top = 0, None
        for j in range(n):
            p = torch.mv(A, V[j])
            if j > 0:
                p -= beta[j - 1] * U[j - 1]
            for _ in range(2):  # reorthogonalize; twice is enough
                p -= U[:j].mT @ (U[:j].conj() @ p)
            alpha[j] = p.norm()
            U[j] = p / alpha[j].clamp_min(eps)
            q = torch.mv(A.mH, U[j]) - alpha[j] * V[j]
            for _ in range(2):
                q -= V[: j + 1].mT @ (V[: j + 1].conj() @ q)
            beta[j] = q.norm()
            V[j + 1] = q / beta[j].clamp_min(eps)
            if (j + 1) % check_every != 0 and j + 1 < n:
                continue
            # The top singular triplet (s, top) of the bidiagonal B = U^H A V has
            # residual r = beta_k |P[k-1, 0]|; s is within r of a singular value
            # of A, and within r^2 / (s^2 - s_2^2) of the top one once r is small.
            k = j + 1
            ab = torch.stack([alpha[:k], beta[:k]]).to("cpu", torch.float64)
            B = torch.diag(ab[0]) + torch.diag(ab[1, : k - 1], 1)
            P, S, Qh = torch.linalg.svd(B)
            if not S[0].item() > 0:
                return  # a zero weight: keep the random draws for the weight it will get
            top = Qh[0]
            r = (ab[1, k - 1] * P[k - 1, 0].abs()).item()
            gap = S[0].item() ** 2 - (S[1].item() ** 2 if k > 1 else 0.0)
            if r <= tol * S[0].item() and r * r <= 0.2 * tol * gap:
                break
        if top is None:
            return
        right = top.to(A.dtype).to(A.device) @ V[:k]
        left = torch.mv(A, right)
        if transposed:
            right, left = left, right
        v.copy_(right / right.norm().clamp_min(eps))
        u.copy_(left / left.norm().clamp_min(eps))


'''

_AUTHOR = "safe_norm <safe-norm@users.noreply.github.com>"


@dataclass
class Patch:
    """One commit of the series: its message and, per file, the text before and after."""

    subject: str
    body: str
    files: dict[str, tuple[str, str]] = field(default_factory=dict)

    def diff(self) -> str:
        out = []
        for path, (old, new) in self.files.items():
            out.append(f"diff --git a/{path} b/{path}\n")
            out.extend(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                            "a/" + path, "b/" + path))
        return "".join(out)

    def format(self, number: int, total: int) -> str:
        """The patch as ``git format-patch`` writes it (``git am`` takes it)."""
        stats = []
        for path, (old, new) in self.files.items():
            lines = list(difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm=""))[2:]
            added = sum(1 for line in lines if line.startswith("+"))
            removed = sum(1 for line in lines if line.startswith("-"))
            stats.append(f" {path} | {added + removed} {'+' * added}{'-' * removed}\n")
        return (f"From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
                f"From: {_AUTHOR}\nSubject: [PATCH {number}/{total}] {self.subject}\n\n"
                f"{self.body.rstrip()}\n---\n{''.join(stats)}\n{self.diff()}-- \nsafe_norm\n\n")


def upstream_source_path() -> str:
    """The installed torch's ``torch/nn/utils/spectral_norm.py``."""
    spec = importlib.util.find_spec("torch.nn.utils.spectral_norm")
    if spec is None or spec.origin is None:
        raise RuntimeError("cannot find torch/nn/utils/spectral_norm.py in the installed torch")
    return spec.origin


def installed_torch_root() -> Path:
    """The directory holding the installed ``torch`` package (paths in the patches are
    relative to it, as to a PyTorch checkout)."""
    return Path(upstream_source_path()).parents[3]


def _read(root: Path, path: str) -> str:
    try:
        return (root / path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RuntimeError(f"{root / path}: not found; give the root of a PyTorch checkout "
                           "(or of an installed torch, for the source patches)") from None


def _missing(path: str, what: str) -> RuntimeError:
    return RuntimeError(f"{path}: {what} was not found; this file differs from the versions the "
                        "patch series is written for (torch 2.1 to 2.15)")


def _find(pattern: re.Pattern[str] | str, source: str, path: str, what: str) -> re.Match[str]:
    """The anchor a patch is placed by, or a clear error naming the file and what is missing."""
    match = re.search(pattern, source, re.M) if isinstance(pattern, str) else pattern.search(source)
    if match is None:
        raise _missing(path, what)
    return match


def _draw_anchor(source: str) -> re.Match[str]:
    return _find(_ANCHOR, source, HOOK_FILE, "the random initialisation of `u`, `v` in SpectralNorm.apply")


def _indented(text: str, indent: str) -> str:
    return "".join(indent + line + "\n" if line else "\n" for line in text.splitlines())


def _hook_fixed(source: str) -> str:
    match = _draw_anchor(source)
    block = _indented(_FIXED_WARM_UP.format(ns=match["ns"] or ""), match["indent"].lstrip("\n"))
    return source[: match.end()] + block + source[match.end():]


def _hook_converged(source: str) -> str:
    match = _draw_anchor(source)
    indent = match["indent"].lstrip("\n")
    fixed = _indented(_FIXED_WARM_UP.format(ns=match["ns"] or ""), indent)
    if fixed not in source:
        raise _missing(HOOK_FILE, "the warm-up of the first patch")
    source = source.replace(fixed, _indented(_CONVERGED_WARM_UP, indent))
    at = source.find("\nclass SpectralNorm:")
    if at < 0:
        raise _missing(HOOK_FILE, "class SpectralNorm")
    return source[: at + 1] + _HELPER + source[at + 1:]


def _param_converged(source: str) -> str:
    match = _find(_PARAM_WARM_UP, source, PARAM_FILE, "the 15-iteration warm-up in _SpectralNorm.__init__")
    source = source[: match.start()] + _indented(_PARAM_CONVERGED, match["indent"]) + source[match.end():]
    imports = _find(r"^from (torch\.nn\.|\.\.)utils import parametrize\n", source, PARAM_FILE,
                    "the import of parametrize")
    line = ("from torch.nn.utils.spectral_norm import _converge_singular_vectors\n"
            if imports[1] == "torch.nn." else "from .spectral_norm import _converge_singular_vectors\n")
    return source[: imports.end()] + line + source[imports.end():]


_UPDATED_ASSERTION = re.compile(
    r"^(?P<indent>[ ]*)# assert that u and v are updated\n"
    r"(?=(?P=indent)input = torch\.randn\(2, 3, device=device\)\n)", re.M)

_PERTURBED = """\
# assert that u and v are updated (they are converged at registration:
# change the weight, so that the power iteration has work to do)
with torch.no_grad():
    m.weight_orig.add_(torch.randn_like(m.weight_orig))
"""

_CASES = """\
(nn.Linear(96, 128), torch.randn(2, 96), 0),
(nn.Conv2d(16, 32, 3), torch.randn(2, 16, 8, 8), 0),
(nn.ConvTranspose2d(32, 16, 3), torch.randn(2, 32, 8, 8), 1),"""

_TEST = """\
def {name}(self):
    # {why}
    for module, input, dim in (
{{cases}}
    ):
        with self.subTest(module=type(module).__name__):
            m = {register}(module).eval()
            with torch.no_grad():
                m(input)
                original = {original}
                sigma = original.norm() / m.weight.norm()
                weight_mat = original.transpose(0, dim).flatten(1)
                expected = torch.linalg.matrix_norm(weight_mat.double(), 2)
            self.assertEqual(sigma.double(), expected, atol=0, rtol=1e-4)

"""

_TEST_HOOK = _TEST.format(
    name="test_spectral_norm_before_training",
    why="gh-51800: an eval() forward right after registration must divide by the spectral norm",
    register="torch.nn.utils.spectral_norm", original="m.weight_orig")

_TEST_PARAM = _TEST.format(
    name="test_new_spectral_norm_before_training",
    why="sigma is the spectral norm from registration on, not after 15 power iterations",
    register="torch.nn.utils.parametrizations.spectral_norm", original="m.parametrizations.weight.original")


def _test_method(template: str, indent: str, decorators: str = "") -> str:
    cases = _indented(_CASES, "        ").rstrip("\n")
    return decorators + _indented(template.format(cases=cases), indent)


def _test_nn_patched(source: str) -> str:
    match = _find(_UPDATED_ASSERTION, source, TEST_NN,
                  "the check that u and v are updated in TestNN.test_spectral_norm")
    source = source[: match.start()] + _indented(_PERTURBED, match["indent"]) + source[match.end():]
    anchor = _find(r"^(?P<indent>[ ]+)def test_spectral_norm_dim\(self\):\n", source, TEST_NN,
                   "TestNN.test_spectral_norm_dim")
    return source[: anchor.start()] + _test_method(_TEST_HOOK, anchor["indent"]) + source[anchor.start():]


def _test_param_patched(source: str) -> str:
    # the new test takes the decorators of its neighbour (e.g. @swap([True, False]))
    anchor = _find(r"^(?P<decorators>(?:[ ]+@.*\n)*)(?P<indent>[ ]+)def test_new_spectral_norm_dim\(self\):\n",
                   source, TEST_PARAM, "TestNNParametrization.test_new_spectral_norm_dim")
    method = _test_method(_TEST_PARAM, anchor["indent"], anchor["decorators"])
    return source[: anchor.start()] + method + source[anchor.start():]


_BODY_1 = """\
Fixes #51800.

`torch.nn.utils.spectral_norm` draws `u` and `v` at random and runs no
power iteration until the first forward in training mode. A module put in
`eval()` right after registration (to check an initialization, to export
it, to evaluate a baseline) divides its weight by `u^T W v` of the random
vectors: its sigma is off by about 100%, sign included.

Run the 15 power iterations that
`torch.nn.utils.parametrizations.spectral_norm` already runs at
registration, after the same random draws. Checkpoints, the random number
stream and the training step are unchanged.
"""

_BODY_2 = """\
Both spectral norms warm `u`, `v` up with a fixed number of power
iterations at registration (15). On freshly initialized layers the top
singular values lie close together, and 15 iterations leave sigma 0.2-3%
low; "iterate until sigma stops changing" stops early for the same reason.

Converge instead, to a stated tolerance (relative 1e-4 on sigma), by
Golub-Kahan-Lanczos bidiagonalization with full reorthogonalization,
started from the random `v` (or `u`, the shorter). Its a posteriori
error bound stops it; it is read every 10 steps (one host
synchronization per check, none per matrix-vector product), at most 100
steps. Both APIs call the same helper.
The random draws, the state dict and the training step are unchanged.
"""

_BODY_3 = """\
Regression tests for the warm-up: right after `spectral_norm(...)`, an
eval() forward divides by a sigma within 1e-4 of the exact spectral norm,
for Linear, Conv2d and ConvTranspose2d, with both APIs. They fail before
this series.

`TestNN.test_spectral_norm` checked that one training forward changes `u`.
Once `u` is converged at registration, one power iteration leaves it
where it is (up to rounding); the test now perturbs the weight first, so
the power iteration has something to do.
"""


def series(torch_root: Path | str | None = None, tree: Path | str | None = None) -> list[Patch]:
    """The patch series: source patches against ``torch_root`` (by default the installed torch;
    a PyTorch checkout works too), and with ``tree`` (a PyTorch checkout) the test patch
    against its ``test/`` files."""
    root = Path(torch_root) if torch_root is not None else installed_torch_root()
    hook0, param0 = _read(root, HOOK_FILE), _read(root, PARAM_FILE)
    hook1 = _hook_fixed(hook0)
    hook2, param2 = _hook_converged(hook1), _param_converged(param0)
    patches = [
        Patch("spectral_norm: warm u and v up at registration", _BODY_1, {HOOK_FILE: (hook0, hook1)}),
        Patch("spectral_norm: converge u and v at registration to a stated tolerance", _BODY_2,
              {HOOK_FILE: (hook1, hook2), PARAM_FILE: (param0, param2)}),
    ]
    if tree is not None:
        tree = Path(tree)
        nn0, par0 = _read(tree, TEST_NN), _read(tree, TEST_PARAM)
        nn1, par1 = _test_nn_patched(nn0), _test_param_patched(par0)
        patches.append(Patch("test: spectral norm is right before the first training forward", _BODY_3,
                             {TEST_NN: (nn0, nn1), TEST_PARAM: (par0, par1)}))
    return patches


def format_series(patches: list[Patch]) -> str:
    return "".join(p.format(i, len(patches)) for i, p in enumerate(patches, 1))


def write_series(patches: list[Patch], directory: Path | str) -> list[Path]:
    """One ``NNNN-subject.patch`` file per patch, as ``git format-patch -o directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, p in enumerate(patches, 1):
        slug = re.sub(r"[^A-Za-z0-9]+", "-", p.subject).strip("-")[:52]
        path = directory / f"{i:04d}-{slug}.patch"
        path.write_text(p.format(i, len(patches)), encoding="utf-8")
        paths.append(path)
    return paths


def upstream_patch(torch_root: Path | str | None = None, tree: Path | str | None = None) -> str:
    """The series as one mailbox text (``git am`` takes it; ``python -m safe_norm upstream-patch``
    prints it).

    Example::

        >>> from safe_norm._patch import upstream_patch
        >>> text = upstream_patch()
        >>> [line for line in text.splitlines() if line.startswith("Subject:")][0]
        'Subject: [PATCH 1/2] spectral_norm: warm u and v up at registration'
    """
    return format_series(series(torch_root, tree))


def load_patched(hook_source: str, param_source: str, tag: str = "patched") -> tuple[ModuleType, ModuleType]:
    """The two modules built from (patched) sources, beside the installed torch's: named
    ``torch.nn.utils._<tag>_spectral_norm`` and ``..._parametrizations`` (up to torch 2.4 the
    files import relatively), the second importing the helper from the first."""
    modules = []
    name = "torch.nn.utils.spectral_norm"
    installed = sys.modules[name]
    try:
        for stem, source in (("spectral_norm", hook_source), ("parametrizations", param_source)):
            module = ModuleType(f"torch.nn.utils._{tag}_{stem}")
            module.__package__ = "torch.nn.utils"
            module.__file__ = f"<{tag} {stem}.py>"
            exec(compile(source, module.__file__, "exec"), module.__dict__)
            modules.append(module)
            sys.modules[name] = module  # what the second file imports from the first
    finally:
        sys.modules[name] = installed
    return modules[0], modules[1]
