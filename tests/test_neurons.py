"""Neuron discovery and masks on every registry architecture and on an unknown .pt2 program."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from onp_core.models import ARCHITECTURES, ImageClassifier, ModelManifest, build_model, load_model, save_model
from onp_core.neurons import discover_neurons, masked, prune
from onp_core.neurons.probe import MaskedNet
from model_helpers import randomise_bn, save_linear_pt2


class _ResidualNet(nn.Module):
    """An architecture the registry does not know: post-activation residual block, no BN in the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.a = nn.Conv2d(12, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.bn(self.a(h)))
        return self.head(h.mean((2, 3)))


def _masks_match(model: nn.Module, neurons, input_shape=(3, 32, 32)) -> None:
    """Random masks on the weights give the masked-activation outputs, change them, and are undone."""
    probe = MaskedNet(neurons)
    g = torch.Generator().manual_seed(1)
    masks = {i: (torch.rand(layer.size, generator=g) > 0.3).float() for i, layer in enumerate(neurons.layers)}
    x = torch.rand(4, *input_shape, generator=g)
    with torch.no_grad():
        plain = model(x)
        probe.set_masks(masks)
        on_activations = probe(x)
        probe.set_masks(None)
        with masked(model, neurons, masks):
            on_weights = model(x)
        restored = model(x)
    assert torch.allclose(on_weights, on_activations, atol=1e-5)
    assert not torch.allclose(on_weights, plain, atol=1e-4), "masks had no effect"
    assert torch.equal(restored, plain), "masked() must restore the weights"


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_mask_on_weights_equals_mask_on_activations(arch: str) -> None:
    model = build_model(ModelManifest(arch=arch, num_classes=10, input_shape=(3, 32, 32))).eval()
    randomise_bn(model)
    neurons = discover_neurons(model, (3, 32, 32))
    assert len(neurons) > 0 and neurons.total > 0
    _masks_match(model, neurons)


def test_preact_neurons_are_bn_channels_before_convs() -> None:
    model = build_model(ModelManifest(arch="preact_resnet18", num_classes=10, input_shape=(3, 32, 32)))
    neurons = discover_neurons(model, (3, 32, 32))
    names = [layer.name for layer in neurons.layers]
    assert "net.layer1.0.bn2" in names and "net.bn" in names
    bn2 = neurons.layers[names.index("net.layer1.0.bn2")]
    assert bn2.producers == ["net.layer1.0.conv1.weight"]
    assert bn2.consumers == ["net.layer1.0.conv2.weight"]
    # the BN after a residual add reads the sum of the stem and the first block's conv2
    bn1 = neurons.layers[names.index("net.layer1.1.bn1")]
    assert set(bn1.producers) == {"net.conv1.weight", "net.layer1.0.conv2.weight"}


def test_resnet_residual_groups_tie_channels_across_blocks() -> None:
    model = build_model(ModelManifest(arch="resnet18", num_classes=10, input_shape=(3, 32, 32)))
    neurons = discover_neurons(model, (3, 32, 32))
    groups = [[neurons.layers[i].name for i in members] for members in neurons.groups.values()]
    assert ["net.bn1", "net.layer1.0.bn2", "net.layer1.1.bn2"] in groups
    assert any("net.layer2.0.shortcut.1" in g and "net.layer2.0.bn2" in g for g in groups)


def test_unknown_residual_pt2_program(tmp_path) -> None:
    net = _ResidualNet().eval()
    randomise_bn(net)
    manifest = ModelManifest(arch="exported", num_classes=5, input_shape=(3, 32, 32))
    save_model(ImageClassifier(net, manifest), tmp_path / "m.pt2", "pt2")
    loaded = load_model(tmp_path / "m.pt2")
    neurons = discover_neurons(loaded.model, (3, 32, 32))
    kinds = sorted((layer.kind, layer.size) for layer in neurons.layers)
    assert kinds == [("bn", 12), ("bn", 12)]
    assert len(neurons.groups) == 1, "stem BN and block BN meet in the residual add"
    x = torch.rand(3, 3, 32, 32)
    before = loaded.model(x)
    prune(loaded.model, neurons, {0: [0, 1, 2]})
    after = loaded.model(x)
    assert not torch.allclose(before, after)
    save_model(loaded.model, tmp_path / "pruned.pt2", "pt2")
    again = load_model(tmp_path / "pruned.pt2")
    assert torch.allclose(again.model(x), after, atol=1e-5)


def _prefix_reuse_matches(model: nn.Module, input_shape: tuple[int, int, int]) -> None:
    from onp_core.defenses.onp.context import ModelContext, PrefixCache

    ctx = ModelContext(model, torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, *input_shape, generator=g)
    cache = ctx.prefix_cache(x)
    chunked = PrefixCache(ctx, x, chunk=4)  # 6 images: two batches of their own through head and tail
    firsts = set()
    n = len(ctx.sizes)
    for layer in sorted({round(i * (n - 1) / 5) for i in range(6)}):  # first pruned layer: six cuts, ends included
        keep = torch.ones(ctx.total)
        keep[ctx.offsets[layer]] = 0
        later = torch.rand(ctx.total, generator=g) > 0.9
        keep[ctx.offsets[layer] + 1:][later[ctx.offsets[layer] + 1:]] = 0
        firsts.add(ctx.net.first_masked_layer(ctx.split_flat(keep)))
        assert torch.allclose(cache.logits(keep), ctx.logits(keep, x), atol=1e-5)
        assert torch.allclose(chunked.logits(keep), ctx.logits(keep, x), atol=1e-5)
    assert torch.equal(cache.logits(None), ctx.logits(None, x))
    assert len(cache.saved) == len(firsts) > 1, "each cut's prefix is computed once and reused"


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_prefix_reuse_gives_the_full_forward_logits(arch: str) -> None:
    """The ONP rewards' prefix reuse (run the graph only from the first pruned layer on) is exact."""
    model = build_model(ModelManifest(arch=arch, num_classes=10, input_shape=(3, 32, 32))).eval()
    randomise_bn(model)
    _prefix_reuse_matches(model, (3, 32, 32))


def test_prefix_reuse_on_an_unknown_residual_pt2_program(tmp_path) -> None:
    net = _ResidualNet().eval()
    randomise_bn(net)
    save_model(ImageClassifier(net, ModelManifest(arch="exported", num_classes=5, input_shape=(3, 32, 32))),
               tmp_path / "m.pt2", "pt2")
    _prefix_reuse_matches(load_model(tmp_path / "m.pt2").model, (3, 32, 32))


@pytest.mark.parametrize("method", ["onp", "anp", "rnp", "clp", "fp"])
def test_every_method_refuses_a_model_with_nothing_to_prune(method, tmp_path) -> None:
    """A model with no hidden neuron (one linear layer) used to crash deep inside each defense (autograd,
    indexing, empty optimiser); now one clear error."""
    from onp_core.data import balanced_subset, load_dataset
    from onp_core.defenses import run_repair
    from onp_core.neurons import NoPrunableNeurons

    save_linear_pt2(tmp_path / "linear.pt2")
    loaded = load_model(tmp_path / "linear.pt2").model
    clean = balanced_subset(load_dataset("cifar10", "test"), 40, seed=0)
    with pytest.raises(NoPrunableNeurons, match="no hidden neurons to prune"):
        run_repair(loaded, clean, method)


class _HiddenUnitsNet(nn.Module):
    """Conv with BN, a conv without, a hidden linear layer (optionally with BN1d), the classifier."""

    def __init__(self, bn1d: bool, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.fc = nn.Linear(48, 20)
        self.norm = nn.BatchNorm1d(20) if bn1d else nn.Identity()
        self.classifier = nn.Linear(20, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.norm(self.fc(self.conv(x)))))




@pytest.mark.parametrize("bn1d", [False, True])
@pytest.mark.parametrize("as_pt2", [False, True])
def test_hidden_linear_units_are_neurons_and_the_classifier_is_not(bn1d: bool, as_pt2: bool, tmp_path) -> None:
    net = randomise_bn(_HiddenUnitsNet(bn1d).eval())
    model = ImageClassifier(net, ModelManifest(arch="exported", num_classes=5, input_shape=(3, 32, 32)))
    if as_pt2:
        save_model(model, tmp_path / "m.pt2", "pt2")
        model = load_model(tmp_path / "m.pt2").model
    neurons = discover_neurons(model, (3, 32, 32))
    found = [(layer.name.rsplit(".", 1)[-1] if "conv" in layer.name else layer.name.split(".")[-1], layer.kind,
              layer.size, layer.spatial) for layer in neurons.layers]
    hidden = ("norm", "bn", 20, False) if bn1d else ("fc", "linear", 20, False)
    assert found == [("1", "bn", 8, True), ("4", "conv", 12, True), hidden]
    assert neurons.layers[-1].consumers[-1].endswith("classifier.weight")
    if bn1d:
        assert neurons.layers[-1].producers[0].endswith("fc.weight")
    _masks_match(model, neurons)
    _prefix_reuse_matches(model, (3, 32, 32))


def test_a_fully_convolutional_head_is_not_pruned() -> None:
    """A conv whose channels are the class scores (NiN-style head) would delete a class if pruned."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten()).eval()
    neurons = discover_neurons(net, (3, 32, 32))
    assert [(layer.name, layer.size) for layer in neurons.layers] == [("0", 8)]


def test_convs_without_bn_meeting_in_an_add_form_a_group() -> None:
    class BareResidual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
            self.head = nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            return self.head(torch.relu(h + self.b(h)).mean((2, 3)))

    net = BareResidual().eval()
    neurons = discover_neurons(net, (3, 32, 32))
    assert [layer.name for layer in neurons.layers] == ["a", "b"]
    assert list(neurons.groups.values()) == [[0, 1]]
    _masks_match(net, neurons)


def test_fine_pruning_prunes_the_last_conv_layer_not_a_hidden_linear_one() -> None:
    from onp_core.data import balanced_subset, load_dataset
    from onp_core.defenses import run_repair

    net = randomise_bn(_HiddenUnitsNet(bn1d=False, classes=10).eval())
    model = ImageClassifier(net, ModelManifest(arch="exported", num_classes=10, input_shape=(3, 32, 32)))
    clean = balanced_subset(load_dataset("cifar10", "test"), 50, seed=0)
    result = run_repair(model, clean, "fp", {"finetune_epochs": 0})
    assert result.details["layer"] == "net.conv.4"


def test_a_decomposed_program_has_the_same_neurons() -> None:
    """``run_decompositions`` turns linear into addmm(b, x, permute(W)); the hidden units and the last
    conv layer must still be found (the classifier, still, must not)."""
    net = randomise_bn(_HiddenUnitsNet(bn1d=False).eval())
    model = ImageClassifier(net, ModelManifest(arch="exported", num_classes=5, input_shape=(3, 32, 32)))
    plain = discover_neurons(model, (3, 32, 32))
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.rand(2, 3, 32, 32),),
                                  dynamic_shapes=({0: batch},)).run_decompositions().module()
    decomposed = discover_neurons(program, (3, 32, 32))
    assert [(layer.name, layer.kind, layer.size, layer.params) for layer in decomposed.layers] == \
        [(layer.name, layer.kind, layer.size, layer.params) for layer in plain.layers]
    _masks_match(program, decomposed)


def test_fine_pruning_runs_on_a_decomposed_program_without_convs() -> None:
    """In a decomposed MLP the hidden layer is ``addmm``, which Fine-Pruning's lookup by op name did not know."""
    from onp_core.data import balanced_subset, load_dataset
    from onp_core.defenses import run_repair

    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 24), nn.ReLU(), nn.Linear(24, 10)).eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)  # what trace_graph re-exports with
    program = torch.export.export(mlp, (torch.rand(2, 3, 32, 32),),
                                  dynamic_shapes=({0: batch},)).run_decompositions().module()
    model = ImageClassifier(program, ModelManifest(arch="exported", num_classes=10, input_shape=(3, 32, 32)))
    clean = balanced_subset(load_dataset("cifar10", "test"), 50, seed=0)
    result = run_repair(model, clean, "fp", {"finetune_epochs": 0})
    assert result.details["layer"].endswith("1") and result.num_pruned > 0
