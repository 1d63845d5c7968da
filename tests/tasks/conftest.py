"""Task tests never touch the user's cache: generated data go to a per-session directory."""

import pytest

from largebatch.tasks.cache import CACHE_ENV


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("largebatch-cache")


@pytest.fixture(autouse=True)
def isolated_cache(session_cache, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(session_cache))
    return session_cache
