"""pytest fixtures: a loopback Hub (:class:`~ota_trainer.testing.local_hub.LocalHub`) with the
real ``huggingface_hub`` client, ``transformers`` and ``ModelCard`` pointed at it.

``tests/conftest.py`` star-imports this module. Usage::

    def test_push(local_hub):
        HfApi().create_repo("me/tiny")               # goes to local_hub.url
        hf_hub_download("me/tiny", ".gitattributes")  # so do the module-level helpers

    @pytest.mark.local_hub(token="secret", lfs=True)  # any LocalHub keyword argument
    def test_private(local_hub):
        ...                                           # HF_TOKEN=secret is set for the client

For each test the fixture starts a fresh hub on ``tmp_path/"local_hub"`` and, through
``monkeypatch`` (undone after the test):

- sets ``HF_ENDPOINT`` (the hub's URL), ``HF_HOME`` (a fresh ``tmp_path/"hf_home"``, so no
  cache is shared between tests), ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HUB_DISABLE_XET=1``,
  and ``HF_TOKEN`` when the hub has a token; removes ``HF_HUB_OFFLINE``,
  ``TRANSFORMERS_OFFLINE``, ``HF_HUB_CACHE``, ``HF_TOKEN_PATH`` and similar overrides (the
  test conftest turns offline mode on for every other test);
- patches the values ``huggingface_hub`` copied from the environment when it was imported:
  ``huggingface_hub.constants`` (``ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``, the
  ``HF_HOME``-derived paths, ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET``), the endpoint of the
  module-level ``HfApi`` behind ``huggingface_hub.create_repo``/``model_info``/...,
  ``transformers``' shared ``HfApi`` (``transformers.utils.hub._hf_api``, used by
  ``Trainer.push_to_hub``; reset so it is rebuilt) and its ``HF_MODULES_CACHE``. That
  configures the library for the test; nothing is mocked.

Subprocesses get the same settings from :func:`hub_env`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .local_hub import LocalHub

__all__ = ["local_hub", "hub_env", "configure_hf_client", "pytest_configure"]

# Environment overrides that would point the client elsewhere than the fixture's HF_HOME or hub.
_CLEARED_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_TOKEN_PATH",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_MODULES_CACHE",
    "TRANSFORMERS_CACHE",
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "local_hub(**kwargs): LocalHub arguments for the local_hub fixture (token=, lfs=, lfs_min_size=, user=)",
    )


def hub_env(
    hub: LocalHub | str, hf_home: str | os.PathLike, token: str | None = None, base: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment for a subprocess (a CLI under test) that should use ``hub``.

    Args:
        hub: a started hub, or its URL.
        hf_home: the process's ``HF_HOME`` (its cache).
        token: sent as ``HF_TOKEN``; ``None`` removes ``HF_TOKEN``.
        base: the environment to start from (default: ``os.environ``).

    Example:
        >>> env = hub_env(local_hub, tmp_path / "home")
        >>> subprocess.run([sys.executable, "scripts/merge_from_hub.py", ...], env=env)
    """
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items() if k not in _CLEARED_ENV and k != "HF_TOKEN"}
    env.update(
        HF_ENDPOINT=hub if isinstance(hub, str) else hub.url,
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def configure_hf_client(
    monkeypatch: pytest.MonkeyPatch, hub: LocalHub, hf_home: str | os.PathLike, token: str | None = None
) -> None:
    """Point ``huggingface_hub`` (already imported or not) and ``transformers`` at ``hub``,
    with a fresh cache under ``hf_home``. Everything is undone with ``monkeypatch``."""
    hf_home = str(hf_home)
    Path(hf_home).mkdir(parents=True, exist_ok=True)
    for key in (*_CLEARED_ENV, "HF_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in hub_env(hub, hf_home, token, base={}).items():
        monkeypatch.setenv(key, value)

    # huggingface_hub read these at import time (maybe before this test, under other settings).
    from huggingface_hub import constants

    old_home = constants.HF_HOME
    for name in dir(constants):  # every path derived from the old HF_HOME (caches, token, markers)
        value = getattr(constants, name)
        if name.isupper() or name.startswith("default_"):
            if isinstance(value, str) and (value == old_home or value.startswith(old_home + os.sep)):
                monkeypatch.setattr(constants, name, hf_home + value[len(old_home) :])
    paths = {
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": os.path.join(hf_home, "hub"),
        "HUGGINGFACE_HUB_CACHE": os.path.join(hf_home, "hub"),
        "HF_ASSETS_CACHE": os.path.join(hf_home, "assets"),
        "HUGGINGFACE_ASSETS_CACHE": os.path.join(hf_home, "assets"),
        "HF_XET_CACHE": os.path.join(hf_home, "xet"),
        "HF_TOKEN_PATH": os.path.join(hf_home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(hf_home, "stored_tokens"),
    }
    settings: dict[str, Any] = {
        **paths,
        "ENDPOINT": hub.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in settings.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)

    # Copies made by `from ..constants import X` in modules already imported.
    copies = {
        "huggingface_hub.utils._cache_manager": {"HF_HUB_CACHE": paths["HF_HUB_CACHE"]},
        "huggingface_hub.utils._cache_assets": {"HF_ASSETS_CACHE": paths["HF_ASSETS_CACHE"]},
        "transformers.utils.hub": {"HF_MODULES_CACHE": os.path.join(hf_home, "modules")},
        "transformers.utils": {"HF_MODULES_CACHE": os.path.join(hf_home, "modules")},
        "transformers.dynamic_module_utils": {"HF_MODULES_CACHE": os.path.join(hf_home, "modules")},
    }
    for module, values in copies.items():
        if module in sys.modules:
            for name, value in values.items():
                if hasattr(sys.modules[module], name):
                    monkeypatch.setattr(sys.modules[module], name, value)

    # The HfApi instance behind huggingface_hub.create_repo, model_info, upload_folder...
    from huggingface_hub import hf_api

    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)
    monkeypatch.setattr(hf_api.api, "_whoami_cache", {})
    # transformers' shared HfApi (Trainer.push_to_hub, ...), made on first use: rebuilt for this hub.
    if "transformers.utils.hub" in sys.modules and hasattr(sys.modules["transformers.utils.hub"], "_hf_api"):
        monkeypatch.setattr(sys.modules["transformers.utils.hub"], "_hf_api", None)


@pytest.fixture
def local_hub(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    """A started :class:`LocalHub` for this test, with the HF client configured to use it.

    ``@pytest.mark.local_hub(token=..., lfs=..., ...)`` passes arguments to ``LocalHub``.
    """
    marker = request.node.get_closest_marker("local_hub")
    kwargs = dict(marker.kwargs) if marker else {}
    hub = LocalHub(tmp_path / "local_hub", **kwargs).start()
    try:
        configure_hf_client(monkeypatch, hub, tmp_path / "hf_home", token=kwargs.get("token"))
        yield hub
    finally:
        hub.stop()
