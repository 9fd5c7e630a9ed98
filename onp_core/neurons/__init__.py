"""Prunable neurons found from the traced graph, and masks applied to weights."""
from .discover import NeuronLayer, NeuronMap, NoPrunableNeurons, discover_neurons, trace_graph
from .masks import apply_masks, masked, prune, pruned_channels

__all__ = ["NeuronLayer", "NeuronMap", "NoPrunableNeurons", "apply_masks", "discover_neurons", "masked", "prune",
           "pruned_channels", "trace_graph"]
