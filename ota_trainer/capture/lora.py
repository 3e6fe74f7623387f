"""The curvature of the frozen weights during LoRA training, rank-one.

A LoRA run's optimizer holds moments of the adapter factors ``A`` and ``B``, not of the weight
``W`` whose edit ``scale * B A`` the merger grafts and averages. What FFG and OTA need is what
Adam's ``exp_avg_sq`` would hold for ``W``: an EMA with ``beta2`` of the squared full-weight
gradient ``G = dL/dW``. For a linear layer ``G = delta^T X`` (the layer output's gradient times
its input, summed over tokens). Only the row and column sums of ``EMA(G*G)`` are stored (format
v1, rank-one); they are linear in ``G*G``, so the EMA of the sums is the sums of the EMA.

Two estimators (:class:`LoraCurvature`):

- ``exact``: ``G`` formed per adapted layer in a backward hook and reduced to row and column
  sums of ``G*G`` at the optimizer step (one weight-gradient matmul per layer and step). With
  gradient accumulation or several processes the step's ``G`` is accumulated (and summed over
  the processes, then divided by their number, as DDP averages gradients) before squaring, as
  Adam squares the gradient it steps with; else it is reduced at once and freed.
- ``factored`` (K-FAC style, no ``G``): ``E[G_ij^2] ~ (sum_t delta_ti^2)(sum_t x_tj^2) / T`` over
  the step's ``T`` tokens: two vector sums per layer and step.

Cost control: ``every=k`` captures one step in ``k``, ``window=N`` only the last ``N`` steps of
the run (both together: one in ``k`` of the last ``N``); steps not captured cost nothing (no
hook fires). A captured step's squared gradient stands for the steps since the previous
capture, with the weights Adam gives them: at capture ``s`` after ``s'``,
``v <- beta2^(s-s') v + (1 - beta2^(s-s')) g_s^2``, and at a save ``T`` steps in, the steps since
the last capture take its ``g^2`` the same way. With every step captured this is Adam's own
``exp_avg_sq``; in general ``v`` holds total weight ``1 - beta2^(T-T0)`` over the window
``(T0, T]`` (``T0 = 0`` without a window). **Bias correction for a window:** the factors are
stored multiplied by ``(1 - beta2^T) / (1 - beta2^(T-T0))``, so that the merger's usual
correction ``1 / (1 - beta2^T)`` (``step = T`` in the metadata) divides by the window's own total
weight. The captured steps align with the run's end (``T - t`` a multiple of ``k``) when the
run's length is known, so the last step is always among them.

Gradient clipping is not applied (a full fine-tune's clipping coefficient is unknown here).
Only the layers LoRA adapts are tracked (their ``W`` is the only one with an edit).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CaptureError, ConfigError
from .names import clean_parameter_name

logger = logging.getLogger(__name__)

__all__ = ["ESTIMATORS", "LoraCurvature", "check_schedule", "is_lora_model"]

ESTIMATORS = ("exact", "factored")
_PEFT_PREFIX = "base_model.model."


def is_lora_model(model: Any) -> bool:
    """A PEFT model with LoRA layers."""
    return getattr(model, "peft_config", None) is not None and any(_is_lora_linear(m) for m in model.modules())


def _is_lora_linear(module: torch.nn.Module) -> bool:
    base = getattr(module, "base_layer", None)
    return isinstance(base, torch.nn.Linear) and hasattr(module, "lora_A")


@dataclass
class _Layer:
    name: str  # the base weight's saved name
    shape: tuple[int, int]  # (out, in)
    row: torch.Tensor  # EMA of the row / column sums of G*G (float64 for the accumulation)
    col: torch.Tensor
    acc: torch.Tensor | None = None  # exact, accumulated: this step's G so far
    pend_row: torch.Tensor | None = None  # exact, at once: this step's sums
    pend_col: torch.Tensor | None = None
    d2: torch.Tensor | None = None  # factored: this step's sum_t delta^2 and sum_t x^2, tokens
    x2: torch.Tensor | None = None
    tokens: int = 0
    last_row: torch.Tensor | None = None  # the last captured step's sums
    last_col: torch.Tensor | None = None
    handles: list = field(default_factory=list)


def check_schedule(every: Any, window: Any) -> None:
    """ConfigError unless ``every`` (>= 1) and ``window`` (None or >= 1) are a capture schedule
    (:class:`LoraCurvature` checks it against the run's length)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"LoRA capture every={every!r}: a whole number of steps >= 1")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ConfigError(f"LoRA capture window={window!r}: None (the whole run) or a whole number of steps >= 1")


class LoraCurvature:
    """Hooks on a PEFT LoRA model's adapted linear layers that estimate each frozen weight's
    second moment (see the module docstring).

    Args:
        model: the PEFT model (wrappers allowed).
        beta2: the optimizer's ``beta2`` (the EMA's decay).
        estimator: ``"exact"`` or ``"factored"``.
        accumulate: whether a step's gradient is accumulated over several backward passes or
            processes (exact: ``G`` is then kept until the step).
        every: capture one optimizer step in ``every`` (1: all).
        window: capture only the last ``window`` steps (None: all); needs ``total_steps``.
        total_steps: the run's optimizer steps (the Trainer's ``max_steps``; None: unknown, and
            the captured steps are then ``every``, ``2 every``, ...).

    Call :meth:`step` right before each optimizer step, :meth:`factors` for what to store and
    :meth:`remove` when training ends.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        beta2: float,
        *,
        estimator: str = "exact",
        accumulate: bool = False,
        every: int = 1,
        window: int | None = None,
        total_steps: int | None = None,
    ):
        if estimator not in ESTIMATORS:
            raise ConfigError(f"LoRA curvature estimator {estimator!r}: choose one of {ESTIMATORS}")
        if not 0.0 <= float(beta2) < 1.0:
            raise ConfigError(f"LoRA curvature needs Adam's beta2 in [0, 1), got {beta2!r}")
        check_schedule(every, window)
        self.beta2, self.estimator, self.accumulate = float(beta2), estimator, accumulate
        self.every, self.window = int(every), window
        self.total = int(total_steps) if total_steps and total_steps > 0 else None
        if window is not None and self.total is None:
            raise ConfigError("LoRA capture window: the run's length (max_steps) must be known to find its last steps")
        if self.total is not None and window is None and every > self.total:
            raise ConfigError(f"LoRA capture every={every} steps never fires in a run of {self.total} steps")
        self.start = max(self.total - window, 0) if window is not None and self.total else 0  # T0
        self.steps = 0  # optimizer steps seen
        self.captured = 0  # of which captured
        self.last = self.start  # the step of the last capture (T0 before the first)
        self.active = self._captures(1)
        self.layers: list[_Layer] = []
        for name, module in model.named_modules():
            if not _is_lora_linear(module):
                continue
            saved = clean_parameter_name(name)
            saved = saved[len(_PEFT_PREFIX) :] if saved.startswith(_PEFT_PREFIX) else saved
            base = module.base_layer  # (out, in) from the layer: a 4-bit (QLoRA) weight is stored packed
            shape = (int(base.out_features), int(base.in_features))
            layer = _Layer(saved + ".weight", shape, *self._zeros(shape))
            layer.handles.append(module.register_forward_hook(self._forward_hook(layer)))
            self.layers.append(layer)
        if not self.layers:
            raise CaptureError("no LoRA-adapted linear layer found: nothing to estimate the curvature of")
        other = [  # LoRA on embeddings or Conv1D layers: adapted, but no estimator for them here
            clean_parameter_name(n)
            for n, m in model.named_modules()
            if hasattr(m, "base_layer")
            and (hasattr(m, "lora_A") or hasattr(m, "lora_embedding_A"))
            and not _is_lora_linear(m)
        ]
        if other:
            logger.warning(
                "LoRA curvature is estimated for linear layers only: %d adapted layer(s) get none (%s); a merge "
                "of this adapter then needs allow_missing_moments (uniform curvature there)",
                len(other),
                ", ".join(other[:3]) + (", ..." if len(other) > 3 else ""),
            )

    def _captures(self, t: int) -> bool:
        """Whether optimizer step ``t`` (1-based) is captured."""
        if t <= self.start:
            return False
        return (self.total - t) % self.every == 0 if self.total else t % self.every == 0

    @staticmethod
    def _zeros(shape) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(shape[0], dtype=torch.float64), torch.zeros(shape[1], dtype=torch.float64)

    def _forward_hook(self, layer: _Layer):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if not self.active or not torch.is_grad_enabled() or not isinstance(out, torch.Tensor):
                return None  # a step not captured, or no backward: nothing to do
            if not out.requires_grad:
                return None
            x = args[0].detach()
            out.register_hook(lambda delta: self._backward(layer, x, delta))
            return None

        return hook

    @torch.no_grad()
    def _backward(self, layer: _Layer, x: torch.Tensor, delta: torch.Tensor) -> None:
        d = delta.detach().reshape(-1, delta.shape[-1]).to(torch.float32)  # (tokens, out)
        xs = x.reshape(-1, x.shape[-1]).to(torch.float32)  # (tokens, in)
        if self.estimator == "factored":
            d2, x2 = (d * d).sum(0), (xs * xs).sum(0)
            layer.d2 = d2 if layer.d2 is None else layer.d2 + d2
            layer.x2 = x2 if layer.x2 is None else layer.x2 + x2
            layer.tokens += d.shape[0]
            return
        g = d.T @ xs  # (out, in): this backward's dL/dW
        if self.accumulate:
            layer.acc = g if layer.acc is None else layer.acc.add_(g)
            return
        sq = g.mul_(g)
        r, c = sq.sum(1, dtype=torch.float64).cpu(), sq.sum(0, dtype=torch.float64).cpu()
        layer.pend_row = r if layer.pend_row is None else layer.pend_row + r
        layer.pend_col = c if layer.pend_col is None else layer.pend_col + c

    @torch.no_grad()
    def step(self) -> None:
        """Fold this step's squared gradient into the EMA (call before the optimizer steps; a step
        not captured only counts)."""
        self.steps += 1
        if self.active:
            self._fold()
        self.active = self._captures(self.steps + 1)

    def _fold(self) -> None:
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        b = self.beta2 ** (self.steps - self.last)  # the steps since the last capture take this one's g^2
        self.last = self.steps
        self.captured += 1
        for layer in self.layers:  # the same order on every process (collectives)
            if self.estimator == "factored":
                d2 = layer.d2 if layer.d2 is not None else torch.zeros(layer.shape[0])
                x2 = layer.x2 if layer.x2 is not None else torch.zeros(layer.shape[1])
                t = torch.tensor([float(layer.tokens)], device=d2.device)
                if world > 1:
                    for v in (d2, x2, t):
                        dist.all_reduce(v)
                bx = x2.double().cpu() / max(float(t.item()), 1.0)
                da = d2.double().cpu()
                r, c = da * bx.sum(), bx * da.sum()
                layer.d2 = layer.x2 = None
                layer.tokens = 0
            elif self.accumulate:
                g = layer.acc if layer.acc is not None else torch.zeros(layer.shape)
                if world > 1:
                    dist.all_reduce(g)
                    g.div_(world)  # DDP averages the processes' gradients
                sq = g.mul_(g)
                r, c = sq.sum(1, dtype=torch.float64).cpu(), sq.sum(0, dtype=torch.float64).cpu()
                layer.acc = None
            else:
                r = layer.pend_row if layer.pend_row is not None else torch.zeros(layer.shape[0], dtype=torch.float64)
                c = layer.pend_col if layer.pend_col is not None else torch.zeros(layer.shape[1], dtype=torch.float64)
                layer.pend_row = layer.pend_col = None
            layer.row.mul_(b).add_(r, alpha=1.0 - b)
            layer.col.mul_(b).add_(c, alpha=1.0 - b)
            layer.last_row, layer.last_col = r, c

    def factors(self):
        """``{base weight name: Rank1Factors}``: the EMA's row and column sums at this step, float32,
        scaled for Adam's bias correction at this step (see the module docstring).

        Raises:
            CaptureError: no step captured yet.
        """
        from ..moments.format import Rank1Factors

        if not self.captured:
            raise CaptureError(f"no LoRA step captured yet ({self.describe()}; {self.steps} steps so far)")
        b, t, t0 = self.beta2, self.steps, self.start
        trail = b ** (t - self.last)  # steps after the last capture: its g^2 stands for them
        fix = (1.0 - b**t) / (1.0 - b ** (t - t0)) if t0 and b > 0 else 1.0
        out = {}
        for layer in self.layers:
            row = (layer.row * trail + layer.last_row * (1.0 - trail)) * fix
            col = (layer.col * trail + layer.last_col * (1.0 - trail)) * fix
            out[layer.name] = Rank1Factors(row.to(torch.float32), col.to(torch.float32), layer.shape)
        return out

    def describe(self) -> str:
        """The schedule in words, e.g. ``every step`` or ``1 step in 4 of the last 100``."""
        what = "every step" if self.every == 1 else f"1 step in {self.every}"
        return what + (f" of the last {self.window}" if self.window is not None else "")

    def metadata(self, model: Any) -> dict[str, Any]:
        """What the moments file records of this capture."""
        cfg = next(iter(getattr(model, "peft_config", {}).values()), None)
        targets = getattr(cfg, "target_modules", None)
        return {
            "capture": "lora",
            "lora_estimator": self.estimator,
            "lora_steps": self.steps,
            "lora_captured_steps": self.captured,
            "lora_every": self.every,
            "lora_window": self.window,
            "beta2": self.beta2,
            "step": self.steps,
            "lora": {
                "r": getattr(cfg, "r", None),
                "lora_alpha": getattr(cfg, "lora_alpha", None),
                "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
                "use_rslora": bool(getattr(cfg, "use_rslora", False)),
                "layers": len(self.layers),
            },
        }

    def remove(self) -> None:
        for layer in self.layers:
            for h in layer.handles:
                h.remove()
            layer.handles.clear()
