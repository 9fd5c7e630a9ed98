"""Mean-replacement pruning (``bench.replacement``, a measurement): constants carry no input, and fitting them
brings the clean function back."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.replacement import clean_means, fitted_constants, with_constants
from onp_core.defenses.common import Tensors
from onp_core.neurons.discover import discover_neurons
from onp_core.neurons.probe import MaskedNet


def _clean_kl(model, reference, x) -> float:
    with torch.no_grad():
        return float(F.kl_div(F.log_softmax(model(x), 1), reference, log_target=True, reduction="batchmean"))


def test_replaced_neurons_output_their_constant_and_the_fit_restores_clean_outputs(fmnist_badnets_subject,
                                                                                   fmnist_clean_500) -> None:
    """A neuron replaced by a constant must output exactly that constant on images it never saw (else it
    could still carry a trigger), and the fitted constants must bring the clean logits closer to the
    upload's than zeroing does (else the fit never reached the network)."""
    model = fmnist_badnets_subject.model
    neurons = discover_neurons(model, tuple(model.manifest.input_shape))
    last = len(neurons.layers) - 1
    pruned = {last: [0, 1, 2, 3], last - 1: [5, 6]}
    clean = Tensors.of(fmnist_clean_500, torch.device("cpu"))
    means = clean_means(neurons, pruned, clean)
    assert all(c.shape == (len(pruned[li]),) and bool((c >= 0).all()) for li, c in means.items())

    replaced = with_constants(model, neurons, pruned, means)
    test, _ = fmnist_badnets_subject.test_sets()
    unseen = test.float()[:64]
    with torch.no_grad():
        _, taps = MaskedNet(discover_neurons(replaced, tuple(model.manifest.input_shape))).forward_with_activations(
            unseen)
    for li, channels in pruned.items():
        out = taps[li][:, channels]
        expected = means[li].view(1, -1, 1, 1).expand_as(out)
        assert torch.allclose(out, expected, atol=1e-5)

    with torch.no_grad():
        reference = F.log_softmax(model(clean.x), 1)
    zeroed = with_constants(model, neurons, pruned, None)
    fitted = with_constants(model, neurons, pruned, fitted_constants(model, neurons, pruned, clean, means))
    kl_zero, kl_mean, kl_fit = (_clean_kl(m, reference, clean.x) for m in (zeroed, replaced, fitted))
    assert kl_fit < kl_zero and kl_fit <= kl_mean + 1e-6
