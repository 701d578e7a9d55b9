import os

import torch
from hypothesis import HealthCheck, settings

# Without a GPU, Triton kernels are tested in the CPU interpreter. Triton reads this when a kernel is
# decorated, so it must be set before any dgr_fast kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", "build", "triton-cache"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# Hypothesis profiles. "ci" (the default) is bounded and derandomised: the same examples on every run, so that CI time
# is predictable and a failure reproduces. "fuzz" (pytest --fuzz) draws many more, at random, for local runs; a failure
# prints the blob that replays it (@reproduce_failure). Tests that fix max_examples themselves keep their own count;
# test_fuzz.py sizes its tests as shares of the profile's.
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])


def pytest_addoption(parser):
    parser.addoption("--fuzz", action="store_true",
                     help="run the hypothesis tests with the 'fuzz' profile: many more random examples (minutes)")


def pytest_configure(config):
    settings.load_profile("fuzz" if config.getoption("--fuzz") else "ci")
