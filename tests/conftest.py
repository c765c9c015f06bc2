"""Suite-wide pytest configuration. Each fixtures module belongs to one area of the code."""

pytest_plugins = [
    "tests.fixtures.vhd",
    "tests.fixtures.nbd",
    "tests.fixtures.s3",
    "tests.fixtures.hostsim",
]


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fastpath_state_dir(tmp_path_factory, monkeypatch):
    """Each test gets its own client state (the repository pins), never the user's."""
    monkeypatch.setenv("FASTPATH_STATE_DIR", str(tmp_path_factory.mktemp("state")))
