"""Helpers shared by the baseline defenses (ANP, RNP, CLP, Fine-Pruning).

Everything here works on any model the engine can load — registry ``nn.Module``\\ s and
``.pt2`` programs alike — because it only touches parameters by name (through
:func:`torch.func.functional_call` or in place) and the graph traced by
:func:`onp_core.neurons.trace_graph`; no module types are assumed.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call

from ..data.augment import augment
from ..data.dataset import ImageSet
from ..models import ImageClassifier
from ..neurons import NeuronMap, prune
from ..neurons.discover import _op_name, _param_name, _weighted_parts, trace_graph
from ..neurons.probe import channel_dim
from .base import working_copy


# ---------------------------------------------------------------- modes and data
def set_training(model: nn.Module, mode: bool) -> None:
    """Like ``model.train(mode)``, but also for ``torch.export`` modules, whose ``train()`` raises.

    A program exported in eval mode keeps its BatchNorms on running statistics whatever
    this flag says (the op is fixed in its graph); registry models switch normally.
    """
    for module in model.modules():
        module.training = mode


@dataclass
class Tensors:
    """A clean split as pre-stacked tensors on the compute device."""

    x: torch.Tensor  # float32 N x C x H x W in [0, 1]
    y: torch.Tensor  # int64 N

    @classmethod
    def of(cls, data: ImageSet, device: torch.device) -> "Tensors":
        # contiguous, not channels-last: an exported program may ``aten.view`` its input, which needs contiguity
        return cls(data.float().to(device), data.labels.to(device))

    def __len__(self) -> int:
        return len(self.y)


def scratch_copy(model: ImageClassifier, device: torch.device) -> ImageClassifier:
    """A throw-away copy of ``model`` on ``device``, its convolutions channels-last where that is safe.

    ANP's 2000 mask iterations on the 16/32/64 CNN (Fashion-MNIST, 128 images, one thread): 40 iterations 6.9–7.8 s
    in the default layout, 5.3 s channels-last (docs/BENCHMARKS.md, session 21). Only registry models switch: an
    exported program may ``aten.view`` a feature map, which fails on channels-last strides (a decomposed program did).
    Only copies that are thrown away take this layout: a returned model stays in the default one, which safetensors
    needs.
    """
    net = working_copy(model).to(device)
    return net if net.exported else net.to(memory_format=torch.channels_last)


def crop_padding(input_shape: Sequence[int]) -> int:
    """The random-crop padding the subjects are trained with: 4 px at 32 px (h/8), 2 px below."""
    h = min(input_shape[1:])
    return h // 8 if h >= 32 else 2


class Sampler:
    """Mini-batches drawn from pre-stacked tensors, seeded, with optional augmentation."""

    def __init__(self, data: Tensors, batch_size: int, seed: int, augment: bool, padding: int, hflip: bool):
        self.data, self.batch_size = data, batch_size
        self.g = torch.Generator().manual_seed(seed)
        self.augment, self.padding, self.hflip = augment, padding, hflip

    def _take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self.data.x.device)
        x, y = self.data.x[idx], self.data.y[idx]
        if self.augment:
            x = augment(x, self.padding, self.hflip, self.g)
        return x, y

    def random_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` samples drawn with replacement (ANP's RandomSampler(replacement=True))."""
        return self._take(torch.randint(0, len(self.data), (self.batch_size,), generator=self.g))

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One shuffled pass in batches (the last one may be short)."""
        order = torch.randperm(len(self.data), generator=self.g)
        for i in range(0, len(order), self.batch_size):
            yield self._take(order[i:i + self.batch_size])


@torch.no_grad()
def accuracy_of(model: nn.Module, data: Tensors, batch_size: int = 1000) -> float:
    """Accuracy in eval mode over pre-stacked tensors, in big batches."""
    if len(data) == 0:
        return float("nan")
    was = model.training
    set_training(model, False)
    correct = 0
    for i in range(0, len(data), batch_size):
        correct += int((model(data.x[i:i + batch_size]).argmax(1) == data.y[i:i + batch_size]).sum())
    set_training(model, was)
    return correct / len(data)


# ---------------------------------------------------------------- soft masks on neuron layers
def scaled_params(model: nn.Module, neurons: NeuronMap, weight_scale: Mapping[int, torch.Tensor],
                  bias_scale: Mapping[int, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Parameter overrides that scale each neuron layer's channels.

    For layer ``li``, its first parameter (BN γ or conv weight) is multiplied channel-wise by
    ``weight_scale[li]`` and its second (BN β or conv bias), if any, by ``bias_scale[li]``.
    This is ANP's / RNP's ``weight * coeff_weight, bias * coeff_bias`` without replacing
    modules, so it also works for ``.pt2`` programs. Feed the result to :func:`functional_call`.
    """
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for li, scale in weight_scale.items():
        names = neurons.layers[li].params
        w = params[names[0]]
        out[names[0]] = w * scale.view(-1, *([1] * (w.ndim - 1)))
        if bias_scale is not None and li in bias_scale and len(names) > 1:
            b = params[names[1]]
            out[names[1]] = b * bias_scale[li].view(-1, *([1] * (b.ndim - 1)))
    return out


def forward_with(model: nn.Module, overrides: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return functional_call(model, overrides, (x,), strict=False)


@torch.no_grad()
def zero_channels(model: nn.Module, neurons: NeuronMap, pruned: Mapping[int, Sequence[int]],
                  weight_only: bool = False) -> None:
    """Prune channels in place: zero γ and β (or only γ / the conv filter when ``weight_only``).

    ``weight_only`` is what the official ANP and RNP code does (``state_dict[bn.weight][k] = 0``):
    the channel then outputs the constant β, which carries no input information. The default
    zeroes β as well, the engine's convention for a removed neuron.
    """
    if not weight_only:
        prune(model, neurons, {li: list(ch) for li, ch in pruned.items() if len(ch)})
        return
    params = dict(model.named_parameters())
    for li, channels in pruned.items():
        if len(channels):
            params[neurons.layers[li].params[0]][list(channels)] = 0


def by_name(neurons: NeuronMap, pruned: Mapping[int, Sequence[int]]) -> dict[str, list[int]]:
    """{layer index: channels} -> {layer name: sorted channels}, empty layers dropped."""
    return {neurons.layers[li].name: sorted(int(c) for c in ch) for li, ch in sorted(pruned.items()) if len(ch)}


def select_by_mask(masks: Mapping[int, torch.Tensor], prune_by: str, threshold: float,
                   number: int | None) -> dict[int, list[int]]:
    """Neurons to prune from learned mask values (ANP / RNP).

    ``threshold``: every neuron whose mask is ≤ ``threshold`` (the official ``evaluate_by_threshold``
    rule). ``number``: the ``number`` neurons with the smallest masks over all layers.
    """
    if prune_by == "threshold":
        return {li: torch.nonzero(m <= threshold).flatten().tolist() for li, m in masks.items()}
    if number is None:
        raise ValueError("prune_by='number' needs prune_number")
    flat = [(float(v), li, c) for li, m in masks.items() for c, v in enumerate(m.tolist())]
    flat.sort(key=lambda t: (t[0], t[1], t[2]))
    out: dict[int, list[int]] = {li: [] for li in masks}
    for _, li, c in flat[:number]:
        out[li].append(c)
    return out


# ---------------------------------------------------------------- graph look-ups
def bn_statistics(model: nn.Module, neurons: NeuronMap,
                  input_shape: Sequence[int]) -> dict[int, tuple[torch.Tensor, float]]:
    """{BN layer index: (running_var, eps)} read from the traced graph (works for ``.pt2``)."""
    gm = trace_graph(model, tuple(input_shape))  # type: ignore[arg-type]
    buffers = dict(model.named_buffers())
    by_weight = {layer.params[0]: li for li, layer in enumerate(neurons.layers) if layer.kind == "bn"}
    out: dict[int, tuple[torch.Tensor, float]] = {}
    for node in gm.graph.nodes:
        op = _op_name(node)
        if "batch_norm" not in op or len(node.args) < 5:
            continue
        li = by_weight.get(_param_name(node.args[1]) or "")
        var_name = _param_name(node.args[4])
        if li is None or var_name is None:
            continue
        var = buffers.get(var_name)
        if var is None:
            var = gm.get_buffer(var_name)
        # (input, w, b, mean, var, momentum, eps) for the no-training op; (…, var, training, momentum, eps…) else
        eps = node.args[6] if op == "_native_batch_norm_legit_no_training" else node.args[7]
        out[li] = (var.detach(), float(eps))
    return out


_ELEMENTWISE_AFTER = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "gelu", "silu", "hardswish",
                      "add", "add_", "dropout", "clone", "alias", "detach", "_to_copy", "to", "contiguous"}


def _activation_node(gm: fx.GraphModule, neurons: NeuronMap, li: int) -> tuple[fx.Node, bool]:
    """The node where neuron layer ``li``'s activation is read, and whether zeroing the layer's
    parameters zeroes exactly that node's channel (no residual add on the way)."""
    layer = neurons.layers[li]

    def reads_the_layer(node: fx.Node) -> bool:
        if "batch_norm" in _op_name(node):
            return len(node.args) > 1 and _param_name(node.args[1]) == layer.params[0]
        parts = _weighted_parts(node)  # conv and linear, plain or decomposed (addmm / mm with a permuted weight)
        return parts is not None and parts[1] == layer.params[0]

    start = next((n for n in gm.graph.nodes if reads_the_layer(n)), None)
    if start is None:
        raise ValueError(f"neuron layer {layer.name} not found in the traced graph")
    target, exact = start, True
    users = list(target.users)
    if len(users) == 1 and _op_name(users[0]) == "getitem":  # batch-norm variants returning a tuple
        target = users[0]
    while True:
        users = list(target.users)
        if len(users) != 1 or _op_name(users[0]) not in _ELEMENTWISE_AFTER:
            break
        target = users[0]
        if _op_name(target) in ("add", "add_"):
            exact = False
    return target, exact


def _scale_channels(t: torch.Tensor, scale: torch.Tensor, channel_last: bool) -> torch.Tensor:
    """``t`` with each channel multiplied by ``scale[c]``."""
    shape = [1] * t.ndim
    shape[channel_dim(t.ndim, channel_last)] = -1
    return t * scale.view(shape)


def _per_channel_sum(t: torch.Tensor, channel_last: bool = False) -> torch.Tensor:
    t = t.detach().movedim(channel_dim(t.ndim, channel_last), 1)
    return t.transpose(0, 1).reshape(t.shape[1], -1).double().mean(1).cpu() * t.shape[0]


class LayerProbe:
    """Fast what-if evaluation of channel pruning in one neuron layer (Fine-Pruning's inner loop).

    One pass over ``data`` records the layer's activation (as the next layer reads it, see
    :func:`_activation_node`) and whatever the rest of the graph needs; :meth:`accuracy` then
    re-runs only the graph's tail with chosen channels of that activation zeroed. Where that is
    not exactly the same as zeroing the layer's parameters (a residual add between the layer and
    the point read), it runs the whole pruned model instead.
    """

    def __init__(self, model: nn.Module, neurons: NeuronMap, li: int, data: Tensors, input_shape: Sequence[int],
                 batch_size: int = 500):
        self.model, self.neurons, self.li, self.data, self.batch_size = model, neurons, li, data, batch_size
        gm = trace_graph(model, tuple(input_shape))  # type: ignore[arg-type]
        self.gm = gm
        self.target, self.exact = _activation_node(gm, neurons, li)
        nodes = list(gm.graph.nodes)
        pos = nodes.index(self.target)
        before, tail = nodes[:pos + 1], nodes[pos + 1:]
        needed = {a for n in tail for a in n.all_input_nodes if nodes.index(a) <= pos}
        needed.add(self.target)
        self.filler = {n: None for n in before if n not in needed}
        self.saved: list[dict[fx.Node, Any]] = []
        sums = torch.zeros(neurons.layers[li].size, dtype=torch.float64)
        with torch.no_grad():
            for i in range(0, len(data), batch_size):
                env: dict[fx.Node, Any] = {}

                class _Keep(fx.Interpreter):
                    def run_node(self, n: fx.Node) -> Any:
                        r = super().run_node(n)
                        if n in needed:
                            env[n] = r
                        return r

                _Keep(gm).run(data.x[i:i + batch_size])
                t = env[self.target]
                sums += _per_channel_sum(t[0] if isinstance(t, (tuple, list)) else t, neurons.layers[li].channel_last)
                self.saved.append(env)
        self.mean = (sums / max(1, len(data))).float()

    def _masks(self, channels: Sequence[int]) -> dict[int, torch.Tensor]:
        group = self.neurons.layers[self.li].group
        members = self.neurons.groups.get(group, [self.li]) if group >= 0 else [self.li]
        masks = {}
        for m in members:
            mask = torch.ones(self.neurons.layers[m].size)
            mask[list(channels)] = 0
            masks[m] = mask
        return masks

    @torch.no_grad()
    def logits(self, channels: Sequence[int]) -> torch.Tensor:
        """Model outputs on ``data`` with ``channels`` of the layer pruned (nothing is modified)."""
        if not self.exact:
            from ..neurons import masked

            with masked(self.model, self.neurons, self._masks(channels)):
                was = self.model.training
                set_training(self.model, False)
                out = torch.cat([self.model(self.data.x[i:i + self.batch_size])
                                 for i in range(0, len(self.data), self.batch_size)])
                set_training(self.model, was)
                return out
        outs = []
        for env in self.saved:
            t = env[self.target]
            keep = torch.ones(self.neurons.layers[self.li].size, device=t.device, dtype=t.dtype)
            keep[list(channels)] = 0
            start = dict(self.filler)
            start.update(env)
            start[self.target] = _scale_channels(t, keep, self.neurons.layers[self.li].channel_last)
            out = fx.Interpreter(self.gm).run(self.data.x[:1], initial_env=start)
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
        return torch.cat(outs)

    def accuracy(self, channels: Sequence[int]) -> float:
        """Accuracy on ``data`` with ``channels`` of the layer pruned."""
        return float((self.logits(channels).argmax(1) == self.data.y).float().mean())


@torch.no_grad()
def mean_activation(model: nn.Module, neurons: NeuronMap, li: int, data: Tensors, input_shape: Sequence[int],
                    batch_size: int = 500) -> torch.Tensor:
    """Mean activation per channel of neuron layer ``li`` over ``data`` (eval mode).

    The layer's output (BN or conv node) is followed forward through single-user element-wise
    ops — the ReLU, and a residual add and its ReLU — so the value measured is the channel's
    activation as the next layer sees it (Fine-Pruning's "activation of the last conv layer").
    """
    gm = trace_graph(model, tuple(input_shape))  # type: ignore[arg-type]
    target, _ = _activation_node(gm, neurons, li)
    sums = torch.zeros(neurons.layers[li].size, dtype=torch.float64)
    captured: list[torch.Tensor] = []

    class _Capture(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if n is target:
                captured.append(_per_channel_sum(result[0] if isinstance(result, (tuple, list)) else result,
                                                 neurons.layers[li].channel_last))
            return result

    interp = _Capture(gm)
    for i in range(0, len(data), batch_size):
        captured.clear()
        interp.run(data.x[i:i + batch_size])
        sums += captured[0]
    return (sums / len(data)).float()


# ---------------------------------------------------------------- reference-only sweep (benchmarks)
def sweep_masks(model: nn.Module, result: Any, clean_test: ImageSet, triggered: ImageSet, target: int,
                thresholds: Sequence[float] | None = None, device: str = "auto") -> dict[str, Any]:
    """Prune ``model`` at each mask threshold of ``result.details['mask_values']``; ACC and ASR per row.

    REFERENCE ONLY: it reads a triggered set, so no defense may call it; benchmarks use it to
    report the best-by-ASR row the ANP/RNP papers' sweeps correspond to.
    """
    import copy

    from ..device import resolve_device
    from ..metrics import accuracy, attack_success_rate
    from ..neurons import discover_neurons

    dev = resolve_device(device)
    if thresholds is None:
        thresholds = [round(0.05 * i, 2) for i in range(19)]  # 0.00 … 0.90, the official pruning_max/step
    values = result.details["mask_values"]
    weight_only = result.details.get("weight_only", True)
    neurons = discover_neurons(model, model.manifest.input_shape)  # type: ignore[union-attr]
    index = {layer.name: li for li, layer in enumerate(neurons.layers)}
    masks = {index[name]: torch.tensor(v) for name, v in values.items() if name in index}
    rows = []
    for t in thresholds:
        net = copy.deepcopy(model)
        set_training(net, False)
        selected = select_by_mask(masks, "threshold", float(t), None)
        zero_channels(net, neurons, selected, weight_only=weight_only)
        net.to(dev)
        rows.append({"threshold": float(t), "num_pruned": sum(len(c) for c in selected.values()),
                     "acc": accuracy(net, clean_test, dev), "asr": attack_success_rate(net, triggered, target, dev)})
    best = min(rows, key=lambda r: (r["asr"], -r["acc"]))
    return {"rows": rows, "best": best, "reference_only": True}


@dataclass
class FinetuneSettings:
    """SGD settings of a clean-data fine-tune (Fine-Pruning's defaults)."""

    epochs: int
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    augment: bool = True
    hflip: bool = False
    seed: int = 1
    padding: int = 4  # random-crop padding (crop_padding(input_shape))
    max_acc_drop: float = 0.05  # a fine-tune ending this far below its starting held-out accuracy has diverged


def finetune_keeping_pruned(net: nn.Module, neurons: NeuronMap, pruned: Mapping[int, Sequence[int]], train: Tensors,
                            held: Tensors, settings: FinetuneSettings, trace: list[dict[str, Any]] | None = None,
                            progress: Any = None,
                            batch_transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                            ) -> str | None:
    """Train the whole ``net`` on clean data; the pruned channels are re-zeroed after every step.

    Shared by Fine-Pruning (its third stage) and ONP's optional fine-tune, so both report
    the same per-epoch trace (loss, train accuracy, held-out accuracy). ``batch_transform``
    (x, y) → x changes the training images, labels kept (ONP stamps synthesised triggers
    on some of them, so the fine-tune unlearns the shortcut instead of relearning it).

    A fine-tune that diverges — a non-finite loss, or held-out accuracy more than
    ``settings.max_acc_drop`` below where it started — is undone and retried once at a tenth of
    the learning rate; if that fails too, ``net`` keeps its starting weights. An exported
    ``.pt2`` program is the case that needs it: its BatchNorm is frozen in eval mode, so nothing
    rescales the updates, and at Fine-Pruning's lr 0.01 a squeeze-and-excitation CNN's loss went
    to NaN in the first epoch (a model at 10% accuracy was returned); at 0.001 it fine-tuned.
    Returns None when a fine-tune was kept, else why none was.
    """
    start_state = copy.deepcopy(net.state_dict())
    start_acc = accuracy_of(net, held)
    why = None
    for lr in (settings.lr, settings.lr / 10):
        why = _finetune_once(net, neurons, pruned, train, held, replace(settings, lr=lr), trace, progress,
                             batch_transform, start_acc)
        if why is None:
            return None
        net.load_state_dict(start_state)
        if trace is not None:
            trace.append({"phase": "finetune", "undone": why, "lr": lr, "acc": start_acc})
    return why


def _finetune_once(net: nn.Module, neurons: NeuronMap, pruned: Mapping[int, Sequence[int]], train: Tensors,
                   held: Tensors, settings: FinetuneSettings, trace: list[dict[str, Any]] | None, progress: Any,
                   batch_transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
                   start_acc: float) -> str | None:
    """One fine-tune at ``settings``; None if it ended sound, else the reason it diverged."""
    params = list(net.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    sampler = Sampler(train, settings.batch_size, settings.seed, settings.augment, settings.padding,
                      settings.hflip)
    try:
        for epoch in range(settings.epochs):
            set_training(net, True)
            correct, seen, loss_sum = 0, 0, 0.0
            for x, y in sampler.epoch():
                if batch_transform is not None:
                    x = batch_transform(x, y)
                opt.zero_grad(set_to_none=True)
                out = net(x)
                loss = F.cross_entropy(out, y)
                if not torch.isfinite(loss):
                    return f"non-finite loss at lr {settings.lr:g} (epoch {epoch + 1})"
                loss.backward()
                opt.step()
                prune(net, neurons, pruned)
                correct += int((out.detach().argmax(1) == y).sum())
                seen += len(y)
                loss_sum += float(loss.detach()) * len(y)
            val = accuracy_of(net, held)
            if trace is not None:
                trace.append({"phase": "finetune", "epoch": epoch + 1, "loss": loss_sum / seen,
                              "train_acc": correct / seen, "acc": val, "lr": settings.lr})
            if progress is not None:
                progress(epoch + 1, settings.epochs, {"phase": "finetune", "loss": loss_sum / seen, "acc": val})
        final = accuracy_of(net, held)
        if final < start_acc - settings.max_acc_drop:
            return f"held-out accuracy fell from {start_acc:.3f} to {final:.3f} at lr {settings.lr:g}"
        return None
    finally:
        for p in params:
            p.requires_grad_(False)
        set_training(net, False)
