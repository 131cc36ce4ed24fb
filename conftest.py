"""Loads the fixtures every test module shares (tests/fixtures.py), for the two course test modules here and tests/."""

pytest_plugins = ["tests.fixtures"]
