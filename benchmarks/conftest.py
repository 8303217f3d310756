import os

import pytest
import torch

# As in tests/conftest.py: Triton reads TRITON_INTERPRET when @triton.jit decorates, so set it before
# anything imports the kernels; without CUDA the triton backend then runs under the interpreter
# (only at the tiny shapes here).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


class _NoBenchmark:
    """Stand-in for pytest-benchmark's fixture when the plugin is missing or disabled: runs the
    function once (the suite's correctness checks still run) and records nothing."""

    disabled = True

    def __init__(self):
        self.extra_info = {}
        self.group = None

    def pedantic(self, fn, args=(), kwargs=None, rounds=1, iterations=1, warmup_rounds=0, setup=None):
        return fn(*args, **(kwargs or {}))

    def __call__(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def _plugin_active(config) -> bool:
    return config.pluginmanager.has_plugin("benchmark")


def pytest_addoption(parser, pluginmanager):
    # Accept the README's command line without pytest-benchmark (this conftest is an initial one
    # whenever `benchmarks` is named on the command line).
    if not pluginmanager.has_plugin("benchmark"):
        group = parser.getgroup("benchmark (pytest-benchmark missing: these options are ignored)")
        group.addoption("--benchmark-disable", action="store_true", default=False)
        group.addoption("--benchmark-json", default=None)


@pytest.fixture
def bench(request):
    """pytest-benchmark's ``benchmark`` fixture, or a stand-in when the plugin is not active."""
    if _plugin_active(request.config):
        return request.getfixturevalue("benchmark")
    return _NoBenchmark()
