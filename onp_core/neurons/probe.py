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


def channel_dim(ndim: int, channel_last: bool) -> int:
    """Where a neuron layer's channels are in its output: dim 1, or the last dim of a linear layer over tokens."""
    return ndim - 1 if channel_last and ndim > 2 else 1


def _mask_and_tap(out: torch.Tensor, mask: torch.Tensor | None, tap: list | None,
                  channel_last: bool = False) -> torch.Tensor:
    """Multiply the channel dim by ``mask`` ([C] or [B, C]); append the result to ``tap``.

    Channels are dim 1, or the last dim for a linear layer over tokens (``channel_last``); the tap
    always holds them in dim 1 ([B, C, ...]), so every consumer of activations reduces them alike.
    """
    channel = channel_dim(out.ndim, channel_last)
    if mask is not None:
        shape = [1] * out.ndim
        shape[channel] = mask.shape[-1]
        if mask.ndim == 2:
            shape[0] = mask.shape[0]
        out = out * mask.view(shape).to(out.dtype)
    if tap is not None:
        tap.append(out.movedim(channel, 1))
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
                new = graph.call_function(_mask_and_tap, (out, mask_node, tap_node, layer.channel_last))
            out.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        self.gm.recompile()
        self._mask_nodes = [n for n in graph.nodes if n.op == "call_function" and n.target is _mask_and_tap]
        self._tails: dict[int, fx.GraphModule] = {}
        self._heads: dict[int, fx.GraphModule] = {}

    # ------------------------------------------------------------ prefix reuse
    def _cut(self, i: int) -> tuple[list[fx.Node], list[fx.Node], list[fx.Node]]:
        """(head nodes, tail nodes, boundary): the tail starts at layer ``i``'s mask, the boundary
        is every head value the tail reads (parameters excepted: the tail reads those itself)."""
        nodes = list(self.gm.graph.nodes)
        pos = nodes.index(self._mask_nodes[i])
        head, tail = nodes[:pos], nodes[pos:]
        in_tail = set(tail)
        boundary = [n for n in head if n.op != "get_attr" and any(u in in_tail for u in n.users)]
        return head, tail, boundary

    def head(self, i: int) -> fx.GraphModule:
        """x → the boundary values of layer ``i``'s cut (see :meth:`tail`), masks as set."""
        if i not in self._heads:
            head, _, boundary = self._cut(i)
            g = fx.Graph()
            env: dict[fx.Node, fx.Node] = {}
            for n in head:
                env[n] = g.node_copy(n, lambda a: env[a])
            g.output(tuple(env[b] for b in boundary))
            self._heads[i] = fx.GraphModule(self.gm, g)
        return self._heads[i]

    def tail(self, i: int) -> fx.GraphModule:
        """The graph from layer ``i``'s mask on: boundary values → logits.

        A candidate whose first pruned layer (in execution order) is ``i`` leaves every
        earlier layer unmasked, so the head's values for a fixed input can be computed once
        and reused for every such candidate (the ONP search's rewards: docs/ONP.md, Speed).
        """
        if i not in self._tails:
            _, tail, boundary = self._cut(i)
            g = fx.Graph()
            env: dict[fx.Node, fx.Node] = {b: g.placeholder(f"boundary_{j}") for j, b in enumerate(boundary)}

            def arg(a: fx.Node) -> fx.Node:
                if a not in env:  # a parameter read before the cut
                    env[a] = g.get_attr(str(a.target))
                return env[a]
            for n in tail:
                if n.op == "output":  # exported graphs return a 1-tuple that their pytree codegen unwraps
                    result = fx.map_arg(n.args[0], arg)
                    g.output(result[0] if isinstance(result, (tuple, list)) and len(result) == 1 else result)
                else:
                    env[n] = g.node_copy(n, arg)
            self._tails[i] = fx.GraphModule(self.gm, g)
        return self._tails[i]

    def first_masked_layer(self, masks: Sequence[torch.Tensor | None]) -> int | None:
        """The earliest layer, in execution order, whose mask is not all ones (None: no such layer)."""
        for i in self._execution_order():
            m = masks[i]
            if m is not None and not bool((m == 1).all()):
                return i
        return None

    def _execution_order(self) -> list[int]:
        if not hasattr(self, "_order"):
            pos = {n: k for k, n in enumerate(self.gm.graph.nodes)}
            self._order = sorted(range(self.num_layers), key=lambda i: pos[self._mask_nodes[i]])
        return self._order

    def _graph_modules(self) -> list[fx.GraphModule]:
        return [self.gm, *self._heads.values(), *self._tails.values()]

    def set_masks(self, masks: Sequence[torch.Tensor | None] | dict[int, torch.Tensor] | None) -> None:
        if masks is None:
            masks = {}
        if not isinstance(masks, dict):
            masks = dict(enumerate(masks))
        for module in self._graph_modules():
            for i in range(self.num_layers):
                setattr(module, f"_onp_mask_{i}", masks.get(i))

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
