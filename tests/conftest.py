import os

import pytest
from hypothesis import settings

from attnzoo.testing import poison_uninitialized

settings.register_profile("default", deadline=None, max_examples=60)
settings.register_profile("ci", deadline=None, max_examples=60, derandomize=True)
settings.register_profile("extended", deadline=None, max_examples=600)
if os.environ.get("ATTNZOO_EXTENDED", "") not in ("", "0"):
    settings.load_profile("extended")
elif os.environ.get("CI"):
    settings.load_profile("ci")
else:
    settings.load_profile("default")


@pytest.fixture(autouse=True)
def _poison_uninitialized_memory():
    """Every torch.empty inside a test is NaN-filled, so reading unwritten memory fails loudly."""
    with poison_uninitialized():
        yield
