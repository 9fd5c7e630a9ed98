"""Find the prunable neurons of any model from its traced graph.

A *neuron* is one channel of a :class:`NeuronLayer`. Where a BatchNorm exists, the
neuron is the BN channel (zeroing its γ and β forces the channel's output to exactly
zero, whatever comes before it — which is what makes PreAct blocks, where BN sits
before the conv, come out right). A conv with no BN after it is its own neuron layer
(zero the filter and bias), and so is a hidden linear layer (zero the row and bias).
A layer whose output reaches the logits through no other conv or linear layer — the
classifier, or a fully-convolutional head — is never a neuron layer: its channels are
the classes, and pruning one would delete a class, not a backdoor.

Models are traced with ``torch.export`` into an ATen graph whose parameter nodes carry
the original parameter names, so one analysis serves registry models and uploaded
``.pt2`` programs alike, with no per-architecture tables.
"""
from __future__ import annotations

import threading
from collections.abc import Container
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import fx, nn

_CONV = {"conv2d", "convolution", "_convolution", "conv1d"}
_BN = {"batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
       "_native_batch_norm_legit_functional", "native_batch_norm", "cudnn_batch_norm"}
_LINEAR = {"linear"}
_ADD = {"add", "add_", "sub"}
# ops that keep channel c of the input in channel c of the output
_CHANNEL_PRESERVING = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "gelu", "silu", "sigmoid",
                       "hardswish", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "max_pool2d_with_indices",
                       "dropout", "clone", "contiguous", "alias", "detach", "getitem", "mul", "div", "_to_copy",
                       "to", "identity", "_assert_tensor_metadata", "view", "flatten", "reshape", "_unsafe_view",
                       "mean", "squeeze", "permute"}


def _op_name(node: fx.Node) -> str:
    if node.op == "call_function":
        target = node.target
        name = getattr(target, "__name__", str(target))
        packet = getattr(target, "_overloadpacket", None)
        if packet is not None:
            name = packet.__name__
        return name.split(".")[0]
    if node.op == "call_method":
        return str(node.target)
    return ""


class NoPrunableNeurons(ValueError):
    """The model has no hidden neuron: no conv or BN channel and no hidden linear unit (e.g. one linear layer).

    Every defense here prunes such channels, so there is nothing they can act on; saying
    so up front beats the unrelated autograd or indexing error each one would hit later.
    """


@dataclass
class NeuronLayer:
    """One prunable layer: ``size`` channels, each zeroed by zeroing ``params[...][c]``."""

    name: str
    kind: str  # "bn", "conv" or "linear"
    params: list[str]
    size: int
    producers: list[str] = field(default_factory=list)  # conv weights whose output channels feed this layer
    consumers: list[str] = field(default_factory=list)  # conv/linear weights that read this layer's output
    order: int = 0  # position in execution order
    node: str = ""  # name of the traced-graph node producing this layer's output
    group: int = -1  # residual group (layers whose channels meet in an add); -1 when alone
    spatial: bool = True  # output has spatial dims (conv / BN2d); False for linear units and BN1d
    channel_last: bool = False  # channels are the output's last dim (a linear layer over tokens, [B, T, C])


@dataclass
class NeuronMap:
    layers: list[NeuronLayer]
    groups: dict[int, list[int]]  # group id -> indices of layers tied by residual adds
    graph_module: fx.GraphModule | None = None  # the traced graph (shares the model's parameters)

    @property
    def total(self) -> int:
        return sum(layer.size for layer in self.layers)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


# torch.export keeps process-global tracing state: two threads exporting at once (the API
# validating concurrent uploads) made one of them fail, so exports in one process take turns
_EXPORT_LOCK = threading.Lock()


def trace_graph(model: nn.Module, input_shape: tuple[int, int, int]) -> fx.GraphModule:
    """An ATen-level fx graph of ``model`` whose get_attr targets are ``model``'s parameter names."""
    if isinstance(model, fx.GraphModule) and any(n.op == "get_attr" for n in model.graph.nodes):
        return model
    was_training = model.training
    model.eval()
    example = (torch.rand(2, *input_shape),)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        with _EXPORT_LOCK:
            program = torch.export.export(model, example, dynamic_shapes=({0: batch},))
    finally:
        model.train(was_training)
    return program.module()


def _param_name(node: object) -> str | None:
    return str(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _feeds_a_weighted_layer(start: fx.Node, weighted: Container[fx.Node]) -> bool:
    """Whether some conv or linear layer reads ``start``'s output, directly or through other ops."""
    stack, seen = list(start.users), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in weighted:
            return True
        stack.extend(n.users)
    return False


def _weighted_parts(node: fx.Node) -> tuple[fx.Node, str | None, str | None] | None:
    """(input, weight name, bias name) of a conv or linear node; None for any other node.

    A linear layer appears as ``linear(x, W, b)`` in a plain export and as ``addmm(b, x, permute(W))`` or
    ``mm(x, permute(W))`` in a decomposed one (``run_decompositions``); both name the same parameter ``W``.
    """
    op = _op_name(node)
    if op in _CONV or op in _LINEAR:
        if len(node.args) < 2 or not isinstance(node.args[0], fx.Node):
            return None
        return node.args[0], _param_name(node.args[1]), _param_name(node.args[2]) if len(node.args) > 2 else None
    if op in {"addmm", "mm"}:
        x_at, w_at = (1, 2) if op == "addmm" else (0, 1)
        if len(node.args) <= w_at or not isinstance(node.args[x_at], fx.Node):
            return None
        w = node.args[w_at]
        if isinstance(w, fx.Node) and _op_name(w) in {"permute", "t", "transpose"} and w.args:
            w = w.args[0]
        return node.args[x_at], _param_name(w), _param_name(node.args[0]) if op == "addmm" else None
    return None


class _Weighted(NamedTuple):
    """A conv or linear node's input and its (resolved) weight and bias parameter names."""

    input: fx.Node
    weight: str
    bias: str | None


def _output_value(node: fx.Node) -> object:
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        val = val[0] if val else None
    return val


def _output_ndim(node: fx.Node) -> int:
    return getattr(_output_value(node), "ndim", 4)


def _batch_leads(node: fx.Node, batch: str | None) -> bool:
    """Whether ``node``'s output has the batch as dim 0, so a per-sample channel mask can be applied to it.

    Attention's projections run on [tokens, batch, C] or [tokens·batch, C] inside PyTorch's multi-head
    attention; their units are not per-sample neurons (``batch`` is the traced input's dim-0 size, as text).
    """
    shape = getattr(_output_value(node), "shape", None)
    return batch is None or shape is None or len(shape) == 0 or str(shape[0]) == batch


def discover_neurons(model: nn.Module, input_shape: tuple[int, int, int]) -> NeuronMap:
    """The model's neuron layers in execution order, with producers, consumers and residual groups."""
    gm = trace_graph(model, input_shape)
    params = dict(model.named_parameters())
    prefix = ""
    nodes = list(gm.graph.nodes)
    conv_of: dict[fx.Node, _Weighted] = {}  # every conv and linear node with a parameter weight
    bn_of: dict[fx.Node, NeuronLayer] = {}
    layers: list[NeuronLayer] = []

    def resolve(name: str | None) -> str | None:
        if name is None:
            return None
        return name if name in params else (prefix + name if prefix + name in params else None)

    for node in nodes:
        op = _op_name(node)
        if op in _BN:
            w = resolve(_param_name(node.args[1]))
            b = resolve(_param_name(node.args[2]))
            if w is not None and b is not None:
                layer = NeuronLayer(name=w.rsplit(".", 1)[0], kind="bn", params=[w, b], size=params[w].shape[0],
                                    node=node.name)
                bn_of[node] = layer
                layers.append(layer)
        elif (parts := _weighted_parts(node)) is not None and (w := resolve(parts[1])) is not None:
            conv_of[node] = _Weighted(parts[0], w, resolve(parts[2]))

    def sources(start: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
        """Walk back through channel-preserving ops and adds: (convs, bns) that feed ``start``."""
        convs, bns, stack, seen = [], [], [start], set()
        while stack:
            n = stack.pop()
            if n in seen or not isinstance(n, fx.Node):
                continue
            seen.add(n)
            if n in bn_of:  # a BN, or (once they are layers) a conv / linear with no BN after it
                bns.append(n)
                continue
            if n in conv_of:
                convs.append(n)
                continue
            op = _op_name(n)
            if op in _ADD:
                stack.extend(a for a in n.args if isinstance(a, fx.Node))
            elif op in _CHANNEL_PRESERVING or op in _BN:
                if n.args and isinstance(n.args[0], fx.Node):
                    stack.append(n.args[0])
        return convs, bns

    # BN layers: producers are the convs feeding their input
    for node, layer in bn_of.items():
        convs, _ = sources(node.args[0])
        layer.producers = [conv_of[c].weight for c in convs]

    # convs and linears not followed by a BN become their own neuron layers
    bn_inputs = {c for node in bn_of for c in sources(node.args[0])[0]}
    for node, (_, w, bias) in conv_of.items():
        if node in bn_inputs:
            continue
        kind = "conv" if _op_name(node) in _CONV else "linear"
        layer = NeuronLayer(name=w.rsplit(".", 1)[0], kind=kind, params=[p for p in (w, bias) if p],
                            size=params[w].shape[0], producers=[w], node=node.name)
        bn_of[node] = layer  # treat as a channel source for grouping
        layers.append(layer)

    # output layers (the classifier; a BN or conv after the last weighted layer) carry the classes
    for node in [n for n in bn_of if not _feeds_a_weighted_layer(n, conv_of)]:
        layers.remove(bn_of.pop(node))
    # layers whose units are not laid out per sample (attention projections) are left alone
    inputs = [_output_value(n) for n in nodes if n.op == "placeholder"]
    batch = next((str(v.shape[0]) for v in inputs if getattr(v, "ndim", 0) == len(input_shape) + 1), None)
    for node in [n for n in bn_of if not _batch_leads(n, batch)]:
        layers.remove(bn_of.pop(node))
    for node, layer in bn_of.items():
        layer.spatial = _output_ndim(node) > 2
        # a linear layer maps the last dim: over a token sequence its units are the last dim, not dim 1
        layer.channel_last = layer.kind == "linear" and layer.spatial

    if not layers:
        raise NoPrunableNeurons("the model has no hidden neurons to prune: no convolution or BatchNorm channel and "
                                "no hidden linear unit before its output layer (pruning defenses act on those; a "
                                "single linear layer has none)")

    # consumers: convs / linears whose input traces back to the layer
    for x, w, _ in conv_of.values():
        _, feeding = sources(x)
        for f in feeding:
            bn_of[f].consumers.append(w)

    # residual groups: neuron layers whose outputs meet at an add (union-find)
    parent = list(range(len(layers)))
    index = {id(layer): i for i, layer in enumerate(layers)}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for node in nodes:
        if _op_name(node) in _ADD:
            _, feeding = sources(node)
            ids = [index[id(bn_of[f])] for f in feeding]
            for a in ids[1:]:
                parent[find(a)] = find(ids[0])
    order_of = {id(layer): i for i, layer in enumerate(sorted(
        layers, key=lambda l: next(k for k, n in enumerate(nodes) if n in bn_of and bn_of[n] is l)))}
    groups: dict[int, list[int]] = {}
    for i in range(len(layers)):
        groups.setdefault(find(i), []).append(i)
    ordered = sorted(layers, key=lambda l: order_of[id(l)])
    remap = {id(l): k for k, l in enumerate(ordered)}
    final_groups: dict[int, list[int]] = {}
    for gid, members in groups.items():
        if len(members) > 1:
            ks = sorted(remap[id(layers[m])] for m in members)
            final_groups[ks[0]] = ks
    for k, layer in enumerate(ordered):
        layer.order = k
    for gid, ks in final_groups.items():
        for k in ks:
            ordered[k].group = gid
    return NeuronMap(ordered, final_groups, gm)
