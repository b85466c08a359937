"""Hugging Face state-dict adapters: how a family's tensors are named in Hugging Face files, in each layout.

moecpt's own names and shapes come from the model itself (built on the meta device: the modules are the one
table of parameter names), so an adapter only maps names:
- every tensor but the experts: `model.` + the moecpt name, with the MoE block's `moe.` spelled `mlp.` (and the
  router, `moe.gate`, spelled as the family's hub layout has it);
- the experts, stacked in moecpt as `moe.experts.gate_up_proj` [E, 2F, H] (gate rows, then up rows) and
  `moe.experts.down_proj` [E, H, F]: the same tensors under `mlp.experts.` in the transformers-5 fused layout,
  or one tensor per expert and projection in the hub layout of the published checkpoints.
A family sets the class attributes below; nothing else is family-specific.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator

import torch

from moecpt.errors import UserError

BIAS = "e_score_correction_bias"


class StateDictAdapter:
    model_cls: type  # the family's CausalLM subclass
    hub_router = "mlp.gate"  # the router's name in the hub layout
    hub_expert = "mlp.experts.{j}."  # the prefix of expert j's tensors in the hub layout
    hub_projections = ("gate_proj", "up_proj", "down_proj")  # expert tensor names: gate, up, down
    bias_in_hf = False  # whether the format has a place for the router's selection bias

    def __init__(self, config):
        self.config = config
        self._shapes: dict[str, tuple[int, ...]] | None = None

    # ---- moecpt names -------------------------------------------------------------------------------------
    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the model's state dict (parameters, tied ones once, and persistent buffers)."""
        if self._shapes is None:
            with torch.device("meta"):
                model = self.model_cls(self.config)
            self._shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
            self._shapes |= {n: tuple(b.shape) for n, b in model.named_buffers()}
        return self._shapes

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's name and shape, in the model's order (tied ones once)."""
        return {n: s for n, s in self.state_shapes().items() if not n.endswith(BIAS)}

    # ---- Hugging Face names -------------------------------------------------------------------------------
    def hf_name(self, name: str, layout: str) -> str:
        """The Hugging Face name of a moecpt tensor that is not an expert weight."""
        if name == "lm_head.weight":
            return name
        router = self.hub_router if layout == "hub" else "mlp.gate"
        return "model." + name.replace(".moe.gate.", f".{router}.").replace(".moe.", ".mlp.")

    def hf_shapes(self, layout: str) -> dict[str, tuple[int, ...]]:
        """Every Hugging Face tensor of this config in `layout`, with its shape."""
        out = {}
        for name, shape in self.state_shapes().items():
            if name.endswith(BIAS) and not self.bias_in_hf:
                continue
            if ".experts." not in name:
                out[self.hf_name(name, layout)] = shape
            elif layout == "fused":
                out["model." + name.replace(".moe.", ".mlp.")] = shape
            else:
                out |= {n: s for n, (s, _) in self.hub_experts(name, shape).items()}
        return out

    def hub_experts(self, name: str, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], Callable]]:
        """The hub tensors of a stacked expert weight: name -> (shape, how to cut it from the stacked one)."""
        layer = "model." + name.split("moe.experts.")[0]
        gate, up, down = self.hub_projections
        out = {}
        for j in range(shape[0]):
            p = layer + self.hub_expert.format(j=j)
            if name.endswith("gate_up_proj"):
                F = shape[1] // 2
                out[p + gate + ".weight"] = ((F, shape[2]), lambda t, j=j, F=F: t[j, :F])
                out[p + up + ".weight"] = ((F, shape[2]), lambda t, j=j, F=F: t[j, F:])
            else:
                out[p + down + ".weight"] = (tuple(shape[1:]), lambda t, j=j: t[j])
        return out

    def optional_hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensors a checkpoint may carry beyond the expected ones: a tied model's copy of the embedding."""
        c = self.config
        return {"lm_head.weight": (c.vocab_size, c.hidden_size)} if c.tie_word_embeddings else {}

    def detect_layout(self, names: set[str]) -> str:
        hub = any(re.search(r"\.experts\.\d+\.", n) for n in names)
        fused = any(".experts.gate_up_proj" in n or ".experts.down_proj" in n for n in names)
        if hub and fused:
            raise UserError("checkpoint mixes the hub expert layout (one tensor per expert) and the stacked "
                            "transformers-5 layout (mlp.experts.gate_up_proj); re-save it with one layout")
        return "fused" if fused else "hub"

    # ---- conversion ---------------------------------------------------------------------------------------
    def from_hf(self, get: Callable[[str], torch.Tensor], layout: str) -> Iterator[tuple[str, torch.Tensor]]:
        """(moecpt name, tensor) for the whole state dict, reading Hugging Face tensors with `get(name)`, one
        moecpt tensor at a time (`hf_tensor`)."""
        for name in self.state_shapes():
            yield name, self.hf_tensor(name, get, layout)

    def hf_tensor(self, name: str, get: Callable[[str], torch.Tensor], layout: str) -> torch.Tensor:
        """The moecpt tensor `name`, read from Hugging Face tensors with `get(hf_name)`: hub-layout experts are
        stacked; a selection bias the format has no place for starts at zero. The one place a family changes
        how a tensor is read (dequantisation, interleaving); loaders call it tensor by tensor, so at most one
        moecpt tensor is assembled at a time."""
        shape = self.state_shapes()[name]
        if name.endswith(BIAS) and not self.bias_in_hf:
            return torch.zeros(shape, dtype=torch.float32)
        if ".experts." not in name:
            return get(self.hf_name(name, layout))
        if layout == "fused":
            return get("model." + name.replace(".moe.", ".mlp."))
        parts = list(self.hub_experts(name, shape))
        if name.endswith("gate_up_proj"):
            return torch.stack([torch.cat([get(g), get(u)]) for g, u in zip(parts[::2], parts[1::2], strict=True)])
        return torch.stack([get(n) for n in parts])

    def hf_region(self, name: str, get: Callable[[str], torch.Tensor],
                  get_slice: Callable[[str, tuple[slice, ...]], torch.Tensor], layout: str,
                  region: tuple[slice, ...]) -> torch.Tensor:
        """The part `region` (one slice per dim, steps of 1) of the moecpt tensor `name`, for a sharded load.
        Where the tensor is a plain rename of one Hugging Face tensor only that part is read (`get_slice(hf_name,
        region)`); hub-layout experts read only the experts `region` covers, each sliced the same way. A family
        that overrides `hf_tensor` (dequantisation, interleaving) gets `hf_tensor`'s result sliced: it stays
        the one override point."""
        if type(self).hf_tensor is not StateDictAdapter.hf_tensor or (name.endswith(BIAS) and not self.bias_in_hf):
            return self.hf_tensor(name, get, layout)[region]
        if ".experts." not in name:
            return get_slice(self.hf_name(name, layout), region)
        if layout == "fused":
            return get_slice("model." + name.replace(".moe.", ".mlp."), region)
        shape = self.state_shapes()[name]
        experts, rest = region[0], region[1:]
        parts = list(self.hub_experts(name, shape))
        if not name.endswith("gate_up_proj"):
            return torch.stack([get_slice(parts[j], rest) for j in range(experts.start, experts.stop)])
        F, rows = shape[1] // 2, rest[0]
        gate_rows = slice(min(rows.start, F), min(rows.stop, F))  # the rows of the gate half, then the up half
        up_rows = slice(max(rows.start, F) - F, max(rows.stop, F) - F)
        stacked = []
        for j in range(experts.start, experts.stop):
            halves = [get_slice(parts[2 * j + k], (r, *rest[1:])) for k, r in enumerate((gate_rows, up_rows))
                      if r.stop > r.start]
            stacked.append(torch.cat(halves))
        return torch.stack(stacked)

    def to_hf(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """moecpt tensors renamed and split into the hub layout (`to_hf_tensor` for each)."""
        out = {}
        for name in self.state_shapes():
            out |= self.to_hf_tensor(name, state[name])
        return out

    def to_hf_tensor(self, name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """One moecpt tensor as its Hugging Face tensor(s) in the hub layout (views of `t`; a meta tensor gives
        the names and shapes alone), so that an export can convert and write one tensor at a time. A selection
        bias the format has no place for is dropped, with a warning when it holds anything."""
        if name.endswith(BIAS) and not self.bias_in_hf:
            if not t.is_meta and bool(t.any()):
                warnings.warn(f"{name} (the router's selection bias) has no place in the Hugging Face "
                              f"{self.config.model_type} format and is not exported; transformers will "
                              "route without it", stacklevel=3)
            return {}
        if ".experts." not in name:
            return {self.hf_name(name, "hub"): t}
        return {n: cut(t) for n, (_, cut) in self.hub_experts(name, tuple(t.shape)).items()}
