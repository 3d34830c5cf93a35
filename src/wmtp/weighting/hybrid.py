"""Hybrid weighting (`algorithm: hybrid`): the weights of two or more schemes combined, docs/method.md §5.5.

Each component is a scheme of the table (`weighting.SCHEMES`) configured by its own recipe section(s), validated
by its own settings model (a hybrid of rho1 and gradnorm has sections `hybrid`, `rho1` and `gradnorm`). Per
optimizer step:
1. every component returns its detached weights over the step's micro-batches (uniform: 1 on every valid pair);
2. each is normalised per head to mean 1 over the valid pairs of the step (all micro-batches, all ranks), so no
   component dominates by its scale; a head whose weights are all zero stays zero;
3. they are combined: `product` w = Π_c w_c, or `mixture` w = Σ_c α_c w_c with α from `mixture_weights`
   (normalised to sum 1; default equal);
4. `mean1_clip(eps, w_max)` per head over the step.
A hybrid of one component returns that scheme's weights when they already satisfy `mean1_clip` (the weighted
modes do: mean 1 and within [eps, w_max] with the same bounds); a selection component's zeros survive step 2 and
the product, but `eps` > 0 raises them to eps in step 4 — set `eps: 0` to keep a selection.

The components' other hooks (their own stages, auxiliary losses, optimizers, metrics, state, files) are all
called; their metrics keep their own prefixes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field, PrivateAttr, create_model, model_validator

from ..config import Strict
from ..loss import IGNORE_INDEX, mean1_clip
from ..runtime.distributed import DistInfo
from ..runtime.tracking import Histogram
from . import SCHEMES, plugin
from .base import (
    RunHooks,
    SchemeContext,
    SchemePlugin,
    StepBatch,
    WeightingScheme,
)
from .per_head import PerHeadRecord, gather_head, per_head_weights, scatter_head

# schemes a hybrid cannot hold: itself, and schemes whose weights may be negative (a mean-1 normalisation and a
# product have no meaning for them) or that replace the step's batches
NOT_COMBINABLE = frozenset({"hybrid", "grpo"})


class HybridSettings(Strict):
    """Recipe section `hybrid`."""

    components: list[str] = Field(min_length=1, description="the schemes combined (names of `algorithm`), each "
                                  "configured by its own recipe section(s)")
    combine: Literal["product", "mixture"] = Field("product", description="product: Π w_c; mixture: Σ α_c w_c")
    mixture_weights: list[float] | None = Field(None, description="mixture: α_c per component (>= 0, normalised "
                                                "to sum 1); default equal")
    eps: float = Field(0.05, ge=0, le=1, description="mean1_clip floor of the combined weights (0 keeps a "
                       "selection component's zeros)")
    w_max: float = Field(3.0, ge=1, description="mean1_clip ceiling of the combined weights")

    @model_validator(mode="after")
    def _components(self) -> HybridSettings:
        for name in self.components:
            if name not in SCHEMES:
                raise ValueError(f"components: unknown scheme `{name}` (choose from "
                                 f"{', '.join(sorted(set(SCHEMES) - NOT_COMBINABLE))})")
            if name in NOT_COMBINABLE:
                raise ValueError(f"components: `{name}` cannot be part of a hybrid")
        if len(set(self.components)) != len(self.components):
            raise ValueError("components: a scheme is listed twice")
        if self.mixture_weights is not None:
            if self.combine != "mixture":
                raise ValueError("`mixture_weights` only applies to combine: mixture")
            if len(self.mixture_weights) != len(self.components):
                raise ValueError(f"mixture_weights has {len(self.mixture_weights)} values for "
                                 f"{len(self.components)} components")
            if any(a < 0 for a in self.mixture_weights) or sum(self.mixture_weights) <= 0:
                raise ValueError("mixture_weights must be >= 0 with a positive sum")
        return self

    def alphas(self) -> list[float]:
        raw = self.mixture_weights or [1.0] * len(self.components)
        return [a / sum(raw) for a in raw]


def _component_sections() -> dict[str, tuple]:
    """Every section a combinable scheme owns, as an optional field (validated by that scheme's own model)."""
    fields: dict[str, tuple] = {}
    for name in sorted(set(SCHEMES) - NOT_COMBINABLE):
        for section, info in plugin(name).settings.model_fields.items():
            fields.setdefault(section, (info.annotation | None, None))
    return fields


class _HybridBase(Strict):
    _components: list[tuple[str, BaseModel]] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _component_settings(self):
        chosen = self.hybrid.components
        used: set[str] = {"hybrid"}
        for name in chosen:
            settings_model = plugin(name).settings
            sections = {s: getattr(self, s) for s in settings_model.model_fields if getattr(self, s) is not None}
            missing = [s for s, info in settings_model.model_fields.items() if info.is_required() and s not in sections]
            if missing:
                raise ValueError(f"component `{name}` needs its `{missing[0]}` section")
            validated = settings_model.model_validate(sections)
            for section in settings_model.model_fields:  # with its defaults: a scheme may score in_forward by default
                if getattr(getattr(validated, section), "scoring", None) == "in_forward":
                    raise ValueError(f"`{section}.scoring: in_forward` cannot be part of a hybrid (a hybrid combines "
                                     f"weights over the whole step; set {section}.scoring: separate_pass)")
            self._components.append((name, validated))
            used |= set(settings_model.model_fields)
        unused = [s for s in type(self).model_fields if s not in used and getattr(self, s) is not None]
        if unused:
            raise ValueError(f"the `{unused[0]}` section belongs to no component of this hybrid "
                             f"({', '.join(chosen)})")
        return self

    @property
    def components(self) -> list[tuple[str, BaseModel]]:
        return self._components


HybridRecipe = create_model("HybridRecipe", __base__=_HybridBase, __doc__="The recipe sections algorithm hybrid "
                            "owns: `hybrid` and each component's own sections.", hybrid=(HybridSettings, ...),
                            **_component_sections())


def normalise_per_head(weights: list[torch.Tensor], valid: list[torch.Tensor], info: DistInfo) -> None:
    """In place: each head's weights divided by their mean over the step's valid pairs (all ranks); 0 elsewhere."""
    n_heads = valid[0].shape[-1]
    for h in range(n_heads):
        values, offset, local = gather_head(weights, valid, h, info)
        mean = values.mean() if values.numel() else values.new_zeros(())
        scaled = values / mean if float(mean) > 0 else values
        scatter_head(weights, valid, h, scaled[offset:offset + local])
    for w, v in zip(weights, valid, strict=True):
        w.masked_fill_(~v, 0.0)


class HybridWeighting(WeightingScheme):
    def __init__(self, settings: HybridSettings, components: list[tuple[str, WeightingScheme]],
                 info: DistInfo) -> None:
        self.settings, self.components, self.info = settings, components, info
        self.record = PerHeadRecord("hybrid")

    def step_weights(self, batches: list[StepBatch]) -> list[torch.Tensor | None]:
        s = self.settings
        valid = [b.labels != IGNORE_INDEX for b in batches]
        combined: list[torch.Tensor] | None = None
        for (_, scheme), alpha in zip(self.components, s.alphas(), strict=True):
            raw = scheme.step_weights(batches)
            weights = [v.float() if w is None else w.detach().float().clone() for w, v in zip(raw, valid, strict=True)]
            normalise_per_head(weights, valid, self.info)
            if combined is None:
                combined = [w * alpha if s.combine == "mixture" else w for w in weights]
            elif s.combine == "product":
                combined = [c * w for c, w in zip(combined, weights, strict=True)]
            else:
                combined = [c + alpha * w for c, w in zip(combined, weights, strict=True)]

        def clip(head: int, values: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            return mean1_clip(values, torch.ones_like(values, dtype=torch.bool), eps=s.eps, w_max=s.w_max), {}

        result = per_head_weights(combined, valid, clip, self.info, prefix="hybrid",
                                  stats=("weight_std", "weight_max", "zero_frac"))
        self.record.add(result.metrics, result.histograms)
        return result.weights

    # every other hook goes to every component ---------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        merged = dict(self.record.metrics)
        for _, scheme in self.components:
            merged.update(scheme.metrics())
        return merged

    def artifacts(self) -> dict[str, str]:
        files = self.record.artifacts()
        for _, scheme in self.components:
            files.update(scheme.artifacts())
        return files

    def histograms(self) -> dict[str, Histogram]:
        merged = self.record.histograms()
        for _, scheme in self.components:
            merged.update(scheme.histograms())
        return merged

    def before_training(self, run: RunHooks) -> None:
        for _, scheme in self.components:
            scheme.before_training(run)

    def auxiliary_loss(self, index: int, batch: StepBatch, out) -> torch.Tensor | None:
        losses = [loss for _, scheme in self.components
                  if (loss := scheme.auxiliary_loss(index, batch, out)) is not None]
        return sum(losses[1:], losses[0]) if losses else None

    def after_backward(self, grad_clip: float | None) -> None:
        for _, scheme in self.components:
            scheme.after_backward(grad_clip)

    def evaluate(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for _, scheme in self.components:
            merged.update(scheme.evaluate())
        return merged

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, state = {}, {}
        for name, scheme in self.components:
            t, s = scheme.state()
            tensors.update({f"{name}.{k}": v for k, v in t.items()})
            if s:
                state[name] = s
        return tensors, state

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        for name, scheme in self.components:
            prefix = f"{name}."
            scheme.load_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                              state.get(name, {}))

    def finish(self, directory: Path) -> None:
        for _, scheme in self.components:
            scheme.finish(directory)


def build(settings, context: SchemeContext) -> HybridWeighting:
    components = [(name, plugin(name).build(component, context)) for name, component in settings.components]
    return HybridWeighting(settings.hybrid, components, context.info)


PLUGIN = SchemePlugin(settings=HybridRecipe, build=build)
