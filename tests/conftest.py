import os
import socket

import pytest
from hypothesis import HealthCheck, settings

from builders import real_images

# Tests see only the built-in formats unless a test registers its own plugin.
os.environ.setdefault("STORPROBE_DISABLE_PLUGIN_AUTOLOAD", "1")

# Fuzzing campaigns: STORPROBE_FUZZ=long runs every property test that leaves
# max_examples to the profile (test_fuzz.py, test_fuzz_table.py, the random
# bytes of test_safety.py, each format's mutated headers, backing names) for
# 100000 examples instead of 200; the one that sets its own count (slow VMDK
# descriptors) keeps it.
# The default profile is derandomized: a test run (and CI) is reproducible,
# and new inputs are the campaigns' job; what they find joins tests/corpus.
_FUZZ_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=_FUZZ_SLOW, derandomize=True)
settings.register_profile("long", max_examples=100_000, deadline=None, suppress_health_check=_FUZZ_SLOW)
settings.load_profile(os.environ.get("STORPROBE_FUZZ", "ci"))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a name or open a socket fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("storprobe touched the network")

    for name in ("getaddrinfo", "gethostbyname", "create_connection"):
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def registered():
    """``registered(plugin)`` registers a throwaway plugin for this test; all are unregistered after it."""
    import storprobe

    plugins = []

    def register(plugin):
        storprobe.register(plugin)
        plugins.append(plugin)

    yield register
    for plugin in plugins:
        storprobe.unregister(plugin)


@pytest.fixture(scope="session")
def real_image_seeds(tmp_path_factory) -> list[bytes]:
    """The real images of every format (``builders.real_images``), made once a
    session (once per xdist worker): the fuzz tests and the differential sample
    mutate copies of these bytes."""
    return real_images(tmp_path_factory.mktemp("seeds"))
