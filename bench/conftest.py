"""pytest bench/ --benchmark-only: the suite's cases as pytest-benchmark tests."""
from bench import use_best_device

ON_GPU = use_best_device()  # before anything imports triton

from bench import cases as presets  # noqa: E402
from bench.providers import PROVIDERS  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true",
                     help="the full suite of `python -m bench` (default: the cases of --quick)")


def pytest_generate_tests(metafunc):
    if {"case", "provider"} <= set(metafunc.fixturenames):
        quick = not metafunc.config.getoption("bench_full")
        cases = presets.build_cases(reduction="mean", **presets.preset(ON_GPU, quick=quick))
        metafunc.parametrize("case", cases, ids=[case.test_id for case in cases])
        metafunc.parametrize("provider", list(PROVIDERS.values()), ids=list(PROVIDERS))
