"""ota_trainer: curvature-aware model merging (OTA + Fast Fisher Grafting) from Adam's second moments.

Pipeline: capture (OTACallback) -> compress -> format (moments files) -> hub -> graft (FFG)
-> aggregate (OTA and baselines) -> write.
"""
__version__ = "0.1.0"

from .config import MergeRecipe, ModelEntry  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError,
    FormatError,
    IncompatibleModelsError,
    MissingMomentsError,
    NumericalError,
    OTAError,
    OutputExistsError,
)
from .format import load_moments, save_moments  # noqa: E402
from .merge import MergeReport, merge  # noqa: E402
from .methods import METHODS  # noqa: E402

__all__ = [
    "__version__",
    "OTACallback",
    "save_optimizer_moments",
    "push_expert",
    "publish_folder",
    "MergeRecipe",
    "ModelEntry",
    "MergeReport",
    "merge",
    "save_moments",
    "load_moments",
    "METHODS",
    "OTAError",
    "ConfigError",
    "FormatError",
    "IncompatibleModelsError",
    "MissingMomentsError",
    "NumericalError",
    "OutputExistsError",
]


def __getattr__(name: str):
    # The callback pulls in transformers' Trainer machinery: import it only when asked for,
    # so `import ota_trainer` (and the merge CLI) stays light.
    if name in ("OTACallback", "save_optimizer_moments"):
        from . import capture

        return getattr(capture, name)
    if name in ("push_expert", "publish_folder"):
        from . import hub

        return getattr(hub, name)
    raise AttributeError(f"module 'ota_trainer' has no attribute {name!r}")
