"""The recipes whose merged bytes tests/test_pinned_outputs.py pins: every method and option the
merger had before the one-runner redesign (#14), on tiny fp32 (three experts: full, full,
rank-one moments) and bf16 (two experts: rank-one, full) models. The ota recipes spell out
``elect_sign: False``, so their bytes stay those pinned whatever the default; ``ota_default``
pins the defaults themselves."""

# name -> (model family, method, parameters, other recipe keys)
RECIPES = {
    "ota": ("fp32", "ota", {"elect_sign": False, "density": 0.4}, {}),
    "ota_threshold": ("fp32", "ota", {"elect_sign": False, "threshold": 1e-20}, {}),
    "ota_per_tensor": ("fp32", "ota", {"elect_sign": False, "density": 0.3, "per_tensor": True}, {}),
    "ota_magnitude": ("fp32", "ota", {"elect_sign": False, "density": 0.4, "score": "magnitude"}, {}),
    "ota_share": ("fp32", "ota", {"elect_sign": False, "saliency_share": 0.9}, {}),
    "ota_mean_p1": ("fp32", "ota", {"elect_sign": False, "density": 0.5, "normalise": "mean", "power": 1.0}, {}),
    "ota_no_graft": ("fp32", "ota", {"elect_sign": False, "graft": False}, {}),
    "ota_no_bias": (
        "fp32",
        "ota",
        {"elect_sign": False, "density": 0.4, "bias_correction": False, "epsilon": 1e-20},
        {},
    ),
    "ota_bf16_out": ("fp32", "ota", {"elect_sign": False, "density": 0.4}, {"dtype": "bfloat16"}),
    "ota_sharded": ("fp32", "ota", {"elect_sign": False, "density": 0.4}, {"options": {"shard_size": "100KB"}}),
    "fisher": ("fp32", "fisher", {}, {}),
    "task_arithmetic": ("fp32", "task_arithmetic", {"lambda": 0.7}, {}),
    "linear": ("fp32", "linear", {}, {}),
    "ties": ("fp32", "ties", {"density": 0.3}, {}),
    "dare": ("fp32", "dare", {"drop_rate": 0.3, "seed": 3}, {}),
    "bf16_ota": ("bf16", "ota", {"elect_sign": False, "density": 0.4}, {}),
    "bf16_ties": ("bf16", "ties", {"density": 0.5, "lambda": 0.9}, {}),
    "bf16_fisher": ("bf16", "fisher", {}, {}),
    "ota_default": ("fp32", "ota", {}, {}),
    "bf16_ota_f32_out": ("bf16", "ota", {"elect_sign": False, "density": 0.2, "power": 1.0}, {"dtype": "float32"}),
}
