"""A pytest plugin (``-p pytorch_tests_compat``) for running an older PyTorch tree's test files
against a newer installed torch: it puts back the few ``torch.testing._internal`` names the
newer torch renamed or dropped, only where they are missing (a no-op on a matching torch).

Seen with the 2.4 tree's ``test/test_nn.py`` on torch 2.13: ``skipIfMps`` (now ``skipIfMPS``),
``common_nn.new_module_tests`` (only feeds generated module tests, none of them spectral),
``common_cuda.tf32_is_not_fp32`` and ``common_mkldnn.bf32_on_and_off`` (CPU: no effect).
"""

from __future__ import annotations

import sys
from typing import Any, Callable


def _install() -> list[str]:
    import importlib

    def module(name: str) -> Any:
        try:
            return importlib.import_module(f"torch.testing._internal.{name}")
        except ImportError:  # older torch: nothing there to complete
            return None

    common_utils, common_nn = module("common_utils"), module("common_nn")
    common_cuda, common_mkldnn = module("common_cuda"), module("common_mkldnn")

    def bf32_on_and_off(*args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return lambda fn: fn

    wanted = [
        (common_utils, "skipIfMps", getattr(common_utils, "skipIfMPS", lambda fn: fn)),
        (common_nn, "new_module_tests", []),
        (common_cuda, "tf32_is_not_fp32", getattr(common_mkldnn, "tf32_is_not_fp32", lambda: False)),
        (common_mkldnn, "bf32_on_and_off", bf32_on_and_off),
    ]
    added = []
    for owner, name, value in wanted:
        if owner is not None and not hasattr(owner, name):
            setattr(owner, name, value)
            added.append(f"{owner.__name__}.{name}")
    return added


def pytest_configure(config: Any) -> None:
    added = _install()
    if added:
        print(f"pytorch_tests_compat: stand-ins for {', '.join(added)}", file=sys.stderr)
