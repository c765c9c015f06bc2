"""Suite-wide pytest configuration. Each fixtures module belongs to one area of the code."""

pytest_plugins = [
    "tests.fixtures.vhd",
    "tests.fixtures.nbd",
    "tests.fixtures.s3",
    "tests.fixtures.hostsim",
]
