"""The oracle pruning frontier (``bench.frontier``, reference only) on a real backdoored subject."""
from __future__ import annotations

from bench.frontier import frontier


def test_oracle_frontier_finds_the_backdoor_neuron_and_reports_on_unseen_images(fmnist_badnets_subject) -> None:
    """One greedy step, chosen on 200 clean and 200 triggered test images, must cut most of a BadNets backdoor
    on the other images: a broken oracle (wrong target, ASR read on the wrong images, a mask that does not
    reach the network) leaves ASR near its 99% start. The report images exclude the ones chosen on."""
    test, triggered = fmnist_badnets_subject.test_sets()
    result = frontier(fmnist_badnets_subject, steps=1, choose=200)
    start, step = result["path"]
    assert result["report_images"] == len(test) - 200 and result["report_triggered"] == len(triggered) - 200
    assert start["asr"] > 0.9 and step["asr"] < 0.5 * start["asr"]
    assert start["acc"] - step["acc"] < 0.05  # one neuron, not a wrecked network
    assert step["neuron"] is not None and ":" in step["neuron"]
