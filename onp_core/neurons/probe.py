"""A traced copy of the model with a channel mask (and a tap) after every neuron layer.

Defenses need two things the plain model cannot give cheaply: per-channel
activations of every neuron layer, and the model's output under *soft* or *per-sample*
channel masks (ANP's neuron perturbations, several candidate masks in one batch).
Rewriting the traced graph once gives both for any architecture, registry or ``.pt2``,
without module hooks (exported programs have no BatchNorm modules to hook).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import fx, nn

from .discover import NeuronMap, _op_name


def _mask_and_tap(out: torch.Tensor, mask: torch.Tensor | None, tap: list | None) -> torch.Tensor:
    """Multiply channel dim 1 by ``mask`` ([C] or [B, C]); append the result to ``tap``."""
    if mask is not None:
        shape = [1] * out.ndim
        if mask.ndim == 1:
            shape[1] = mask.shape[0]
        else:
            shape[0], shape[1] = mask.shape[0], mask.shape[1]
        out = out * mask.view(shape).to(out.dtype)
    if tap is not None:
        tap.append(out)
    return out


def _output_node(gm: fx.GraphModule, name: str) -> fx.Node:
    node = next(n for n in gm.graph.nodes if n.name == name)
    users = list(node.users)
    if users and all(_op_name(u) == "getitem" for u in users):  # BN ops that return (out, mean, invstd)
        return next(u for u in users if u.args[1] == 0)
    return node


class MaskedNet(nn.Module):
    """``forward(x)`` = the model's logits under the masks set with :meth:`set_masks`.

    Shares parameters with the model it was traced from, so weight edits show through.
    """

    def __init__(self, neurons: NeuronMap):
        super().__init__()
        if neurons.graph_module is None:
            raise ValueError("NeuronMap has no traced graph")
        import copy

        gm = neurons.graph_module
        self.gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        graph = self.gm.graph
        self.num_layers = len(neurons.layers)
        for i, layer in enumerate(neurons.layers):
            self.gm.register_buffer(f"_onp_mask_{i}", None, persistent=False)
            setattr(self.gm, f"_onp_tap_{i}", None)
            out = _output_node(self.gm, layer.node)
            with graph.inserting_after(out), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mask_node = graph.get_attr(f"_onp_mask_{i}")
            with graph.inserting_after(mask_node), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tap_node = graph.get_attr(f"_onp_tap_{i}")
            with graph.inserting_after(tap_node):
                new = graph.call_function(_mask_and_tap, (out, mask_node, tap_node))
            out.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        self.gm.recompile()

    def set_masks(self, masks: Sequence[torch.Tensor | None] | dict[int, torch.Tensor] | None) -> None:
        if masks is None:
            masks = {}
        if not isinstance(masks, dict):
            masks = dict(enumerate(masks))
        for i in range(self.num_layers):
            setattr(self.gm, f"_onp_mask_{i}", masks.get(i))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gm(x)

    def forward_with_activations(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and every neuron layer's (masked) output for ``x``."""
        taps: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        for i in range(self.num_layers):
            setattr(self.gm, f"_onp_tap_{i}", taps[i])
        try:
            logits = self.gm(x)
        finally:
            for i in range(self.num_layers):
                setattr(self.gm, f"_onp_tap_{i}", None)
        return logits, [t[0] if t else torch.empty(0) for t in taps]
