"""What a pruned neuron is replaced by: zero, or a constant chosen on the clean data.

    .venv/bin/python -m bench.replacement docs/benchmarks/<run>/cpu.json [--methods onp] [--out DIR]

The engine prunes a neuron by zeroing it (BN γ and β, or a conv's filter and bias). That does two things
at once: it removes the neuron's input-dependent output, and it shifts every downstream pre-activation by
the neuron's mean contribution. Mean-replacement pruning keeps the first and undoes the second: the
neuron outputs a constant (γ = 0, β = c), which carries no input information either, so it cannot carry
a trigger. This reads the rows of a ``bench.compare`` JSON (their ``neurons``), re-applies each repair's
neurons three ways on the same subject, and reports ACC / ASR on the full test split:

- **zero**: the engine's convention (the repair as it was returned);
- **clean mean**: c = the neuron's mean output on the row's 500 clean images, as the probe taps it. In the
  small CNN the ReLU after each BN is in place, so the tap is after it, c ≥ 0 and the ReLU passes c unchanged;
  where the activation is not in place the tap is before it and the layers after see act(c), not E[act];
- **fitted**: the constants fitted (Adam, 100 full-batch steps from the clean mean) so the repaired
  network's clean logits match the upload's (KL): the most clean function constants can give back.

A backdoor that returns under constants was not cut by the pruning; it was held down by the shift. The
clean images only choose the constants; the triggered test set is read only to report ASR.
"""
from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from onp_core.data import balanced_subset, load_dataset
from onp_core.defenses.common import Tensors, forward_with
from onp_core.metrics import Metrics, der, evaluate
from onp_core.models import ImageClassifier
from onp_core.neurons.discover import NeuronMap, discover_neurons
from onp_core.neurons.masks import prune
from onp_core.neurons.probe import MaskedNet

from .compare import as_exported_program
from .zoo import ATTACKS, EPOCHS, PROFILES, load_zoo, pct, zoo_specs

Pruned = dict[int, list[int]]


def with_constants(model: ImageClassifier, neurons: NeuronMap, pruned: Pruned,
                   constants: Mapping[int, torch.Tensor] | None) -> ImageClassifier:
    """A copy of ``model`` with ``pruned`` zeroed, then each pruned neuron's bias set to its constant.

    Layers without a bias parameter (a bias-free conv or linear unit) keep zero: there is nowhere to put c.
    """
    out = copy.deepcopy(model)
    prune(out, neurons, pruned)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for li, c in (constants or {}).items():
            names = neurons.layers[li].params
            if len(names) > 1:
                params[names[1]][pruned[li]] = c.to(params[names[1]].dtype)
    return out


def clean_means(neurons: NeuronMap, pruned: Pruned, clean: Tensors) -> dict[int, torch.Tensor]:
    """Each pruned neuron's mean output over the clean images (and positions), read from ``neurons``' traced graph."""
    with torch.no_grad():
        _, taps = MaskedNet(neurons).forward_with_activations(clean.x)
    return {li: taps[li].movedim(1, 0).reshape(neurons.layers[li].size, -1).mean(1)[ch] for li, ch in pruned.items()}


def fitted_constants(model: ImageClassifier, neurons: NeuronMap, pruned: Pruned, clean: Tensors,
                     start: Mapping[int, torch.Tensor], steps: int = 100, lr: float = 0.05) -> dict[int, torch.Tensor]:
    """Constants that bring the repaired network's clean logits closest (KL) to the upload's."""
    with torch.no_grad():
        reference = F.log_softmax(model(clean.x), 1)
    base = with_constants(model, neurons, pruned, start)
    params = dict(base.named_parameters())
    fit = {li: c.clone().requires_grad_(True) for li, c in start.items() if len(neurons.layers[li].params) > 1}
    if not fit:
        return {}
    opt = torch.optim.Adam(list(fit.values()), lr=lr)
    for _ in range(steps):
        overrides = {}
        for li, c in fit.items():
            name = neurons.layers[li].params[1]
            overrides[name] = params[name].detach().index_put((torch.tensor(pruned[li]),), c)
        loss = F.kl_div(F.log_softmax(forward_with(base, overrides, clean.x), 1), reference, log_target=True,
                        reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {li: c.detach() for li, c in fit.items()}


def replay(row: dict[str, Any], subject: Any, n_clean: int) -> dict[str, Any]:
    """One compare row's neurons under the three replacements.

    A row repaired as a ``.pt2`` upload names its neurons by the exported program's layers, so it is replayed on
    the same export.
    """
    model = as_exported_program(subject.model) if row.get("arch", "").endswith("(.pt2)") else subject.model
    neurons = discover_neurons(model, tuple(model.manifest.input_shape))
    index = {layer.name: i for i, layer in enumerate(neurons.layers)}
    pruned = {index[name]: list(ch) for name, ch in row["neurons"].items()}
    clean = Tensors.of(balanced_subset(load_dataset(subject.spec.dataset, "train"), n_clean,
                                       seed=100 + row["seed"]), torch.device("cpu"))
    test, triggered = subject.test_sets()
    target = subject.attack.target if subject.attack else None
    before = evaluate(model, test, triggered, target)
    means = clean_means(neurons, pruned, clean)
    variants = {"zero": None, "clean mean": means, "fitted": fitted_constants(model, neurons, pruned, clean, means)}
    out = {"subject": row["subject"], "method": row["method"], "seed": row["seed"], "pruned": row["pruned"],
           "acc_before": before.acc, "asr_before": before.asr}
    for name, constants in variants.items():
        after: Metrics = evaluate(with_constants(model, neurons, pruned, constants), test, triggered, target)
        out[name] = {"acc": after.acc, "asr": after.asr, "der": der(before, after)}
    return out


def markdown(rows: list[dict[str, Any]], source: Path) -> str:
    lines = [f"Neurons from `{source}`; ACC / ASR (%) on the full test split.\n",
             "| subject | method | seed | neurons | before | zero | clean mean | fitted |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{pct(r[v]['acc'])} / {pct(r[v]['asr'])}" for v in ("zero", "clean mean", "fitted")]
        lines.append(f"| {r['subject']} | {r['method']} | {r['seed']} | {r['pruned']} | "
                     f"{pct(r['acc_before'])} / {pct(r['asr_before'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("compare_json", type=Path, help="a bench.compare result JSON whose rows name their neurons")
    parser.add_argument("--profile", choices=PROFILES, default="cpu", help="the profile the JSON's subjects are in")
    parser.add_argument("--methods", nargs="+", default=["onp"])
    parser.add_argument("--n-clean", type=int, default=500)
    parser.add_argument("--out", type=Path, default=None, help="folder for replacement.json / .md (default: beside "
                        "the compare JSON)")
    args = parser.parse_args()
    compare_rows = [r for r in json.loads(args.compare_json.read_text())
                    if r["method"] in args.methods and r.get("neurons") and r.get("pruned")]
    specs = {s.key(): s for s in zoo_specs(args.profile, list(EPOCHS), list(ATTACKS))}
    subjects: dict[str, Any] = {}
    rows = []
    for row in compare_rows:
        if row["subject"] not in specs:
            print(f"{row['subject']}: not a {args.profile}-profile subject, skipped")
            continue
        if row["subject"] not in subjects:
            spec = specs[row["subject"]]
            cached = load_zoo(args.profile, [spec.dataset], [spec.attack], cached_only=True)
            subjects[row["subject"]] = cached[0] if cached else None
        if subjects[row["subject"]] is None:
            print(f"{row['subject']}: not trained here (python -m bench.zoo --profile {args.profile}), skipped")
            continue
        rows.append(replay(row, subjects[row["subject"]], args.n_clean))
        r = rows[-1]
        print(f"{r['subject']} seed {r['seed']} {r['method']}: " + "  ".join(
            f"{v} {pct(r[v]['acc'])}/{pct(r[v]['asr'])}" for v in ("zero", "clean mean", "fitted")), flush=True)
    out = args.out or args.compare_json.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "replacement.json").write_text(json.dumps(rows, indent=2))
    (out / "replacement.md").write_text(markdown(rows, args.compare_json))
    print(markdown(rows, args.compare_json))


if __name__ == "__main__":
    main()
