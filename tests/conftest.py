import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Shared, noisy machines: no deadlines, bounded examples, reproducible draws.
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=int(os.environ.get("SAFE_NORM_EXAMPLES", "25")),
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")

# scripts/gpu_check.py runs the suite once more with the default device set to CUDA.
if os.environ.get("SAFE_NORM_TEST_DEVICE"):
    torch.set_default_device(os.environ["SAFE_NORM_TEST_DEVICE"])


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # One thread: reductions are then ordered the same in both libraries and in every run.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def pytest_terminal_summary(terminalreporter):
    from tests import test_compile

    if test_compile.REPORT:
        terminalreporter.write_sep("-", "torch.compile graph breaks (torch._dynamo.explain)")
        for line in test_compile.REPORT:
            terminalreporter.write_line(line)
