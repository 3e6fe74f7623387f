"""ota_trainer: curvature-aware model merging (OTA + Fast Fisher Grafting) from Adam's second moments.

Pipeline: capture (OTACallback) -> moments (format, rank-one) -> hub -> merger (recipe, inputs,
runner, methods) on backends (native kernels, PyTorch) -> io (writer, output folder).
"""

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "OTACallback",
    "save_optimizer_moments",
    "push_expert",
    "publish_folder",
    "save_ffg_histogram",
    "MergeRecipe",
    "ModelEntry",
    "MergeReport",
    "merge",
    "HubResolver",
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
    "OutputError",
]


# Public name -> the submodule defining it. Imported on first use (PEP 562), so that `import
# ota_trainer` and its light modules (merger, io, hub, the native backend) do not load PyTorch:
# a merge the native kernels cover never loads it, and the CLI starts its disk reads first thing.
_LAZY = {
    "MergeRecipe": "merger.recipe",
    "ModelEntry": "merger.recipe",
    "METHODS": "merger.methods",
    "load_moments": "moments.format",
    "save_moments": "moments.format",
    "merge": "hub",  # folders or Hub repo ids (ota_trainer.merger.merge: folders only)
    "HubResolver": "hub",
    "MergeReport": "merger.report",
    "OTACallback": "capture",
    "save_optimizer_moments": "capture",  # pulls in transformers' Trainer
    "push_expert": "hub",
    "publish_folder": "hub",
    "save_ffg_histogram": "merger.ffg_shipped",
    **dict.fromkeys(
        (
            "ConfigError",
            "FormatError",
            "IncompatibleModelsError",
            "MissingMomentsError",
            "NumericalError",
            "OTAError",
            "OutputExistsError",
            "OutputError",
        ),
        "errors",
    ),
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ota_trainer' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
