"""The fuzz tests' Hypothesis profiles.

``ci`` (the default) is reproducible and quick: a fixed seed (``derandomize``), a modest number
of examples, no deadline (each test checks its own time bound per example, which is what a
worker's time limit means). ``deep`` explores for real: ``HYPOTHESIS_PROFILE=deep``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=SLOW_IS_FINE,
)
settings.register_profile(
    "deep",
    max_examples=2000,
    deadline=None,
    print_blob=True,
    suppress_health_check=SLOW_IS_FINE,
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def examples(ci: int) -> int:
    """Examples for one test: ``ci`` under the ci profile, the profile's own number otherwise."""
    return ci if PROFILE == "ci" else settings.get_profile(PROFILE).max_examples
