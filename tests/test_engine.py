"""The engine's ground floor: subjects on real data, attacks, metrics, the CLI."""
from __future__ import annotations

import json
import platform
import resource

import pytest
import torch
from typer.testing import CliRunner

from onp_core.attacks import ATTACKS, make_attack
from onp_core.data import ImageSet, balanced_subset, load_dataset
from onp_core.metrics import Metrics, der
from onp_cli.main import app


@pytest.mark.slow
def test_cifar10_badnets_subject_meets_the_bar(cifar_badnets_subject) -> None:
    m = cifar_badnets_subject.metrics
    assert m["acc"] >= 0.75, m
    assert m["asr"] >= 0.95, m


@pytest.mark.slow
def test_fashion_mnist_badnets_subject_meets_the_bar(fmnist_badnets_subject) -> None:
    m = fmnist_badnets_subject.metrics
    assert m["acc"] >= 0.88, m
    assert m["asr"] >= 0.95, m


@pytest.fixture(scope="module")
def small_real_set() -> ImageSet:
    return balanced_subset(load_dataset("cifar10", "test"), 200, seed=0)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attacks_poison_and_trigger_as_specified(name: str, small_real_set: ImageSet) -> None:
    attack = make_attack(name, target=3)
    poisoned = attack.poison_training_set(small_real_set, 0.1)
    idx = torch.nonzero(poisoned.meta["poisoned"]).flatten()
    assert len(idx) == (20 if not attack.clean_label else 20)
    if attack.clean_label:  # SIG: only target-class images, labels untouched
        assert bool((small_real_set.labels[idx] == 3).all())
        assert torch.equal(poisoned.labels, small_real_set.labels)
    else:
        assert bool((small_real_set.labels[idx] != 3).all())
        assert bool((poisoned.labels[idx] == 3).all())
    assert not torch.equal(poisoned.images[idx], small_real_set.images[idx]), "trigger must change the images"
    triggered = attack.triggered_test_set(small_real_set)
    assert bool((triggered.labels != 3).all()) and len(triggered) == int((small_real_set.labels != 3).sum())
    again = make_attack(name, target=3).triggered_test_set(small_real_set)
    assert torch.equal(triggered.images, again.images), "triggers are deterministic"


@pytest.mark.parametrize("options,changed", [
    ({"pattern": "checker", "size": 4, "position": "top-left"}, (slice(1, 5), slice(1, 5))),
    ({"pattern": "random", "size": 5, "position": "bottom-left"}, (slice(26, 31), slice(1, 6))),
    ({"pattern": "white", "size": 3, "position": "center"}, (slice(14, 17), slice(14, 17))),
])
def test_patch_options_stamp_their_pattern_where_asked(options: dict, changed: tuple, small_real_set: ImageSet) -> None:
    """The held-out trigger shapes (bench ``triggers`` profile) change exactly the patch they describe."""
    x = small_real_set.images[:8].float() / 255
    y = make_attack("badnets", target=1, **options).apply(x)
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[changed] = True
    assert torch.equal(y[..., ~inside], x[..., ~inside]), "nothing outside the patch may change"
    patch = y[..., inside].reshape(8, 3, -1)
    assert torch.equal(patch, patch[:1].expand_as(patch)), "the patch is the same on every image"
    if options["pattern"] == "checker":
        assert set(patch.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="position"):
        make_attack("badnets", position="middle")


def test_smooth_blend_key_is_low_frequency_and_seeded(small_real_set: ImageSet) -> None:
    smooth, noise = make_attack("blended", key="smooth", seed=4), make_attack("blended", seed=4)
    shape = small_real_set.images.shape
    key, rough = smooth.pattern(shape), noise.pattern(shape)
    assert torch.equal(key, make_attack("blended", key="smooth", seed=4).pattern(shape))
    # neighbouring pixels of a 4×4 grid upsampled to 32 px differ by far less than independent noise does
    assert (key[..., 1:] - key[..., :-1]).abs().mean() < 0.2 * (rough[..., 1:] - rough[..., :-1]).abs().mean()


def test_attack_options_key_the_subject_cache() -> None:
    from onp_core.subjects import SubjectSpec

    plain = SubjectSpec(dataset="fashion_mnist", attack="badnets")
    checker = SubjectSpec(dataset="fashion_mnist", attack="badnets", attack_options={"pattern": "checker"})
    assert plain.key() == "v2-small_cnn-fashion_mnist-badnets-t0-p0.1-e10-s0", "default subjects keep their cache key"
    assert checker.key() != plain.key() and checker.attack_label() == "badnets[pattern=checker]"


@pytest.mark.slow
def test_per_class_accuracy_catches_an_erased_class(fmnist_badnets_subject) -> None:
    """Suppressing one class's logit erases it; overall accuracy hides it, the per-class check does not."""
    import copy

    from onp_core.metrics import accuracy, class_recall, erased_classes

    test = balanced_subset(load_dataset("fashion_mnist", "test"), 1000, seed=0)
    model = fmnist_badnets_subject.model
    damaged = copy.deepcopy(model)
    head = [m for m in damaged.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.bias[6] -= 1000.0
    before, after = class_recall(model, test, 10), class_recall(damaged, test, 10)
    assert after[6] == 0.0 and before[6] > 0.5
    assert accuracy(model, test) - accuracy(damaged, test) < 0.1  # one class of ten: a few points overall
    assert erased_classes(before, after) == [6]
    assert erased_classes(before, before) == []


def test_der_matches_backdoorbench_definition() -> None:
    before, after = Metrics(acc=0.90, asr=0.95), Metrics(acc=0.88, asr=0.05)
    assert der(before, after) == pytest.approx((0.90 - 0.02 + 1) / 2)
    assert der(before, Metrics(acc=0.91, asr=0.99)) == pytest.approx(0.5)
    assert der(Metrics(0.9), Metrics(0.9)) is None


def test_cli_help_lists_the_commands() -> None:
    out = CliRunner().invoke(app, ["--help"]).output
    for command in ("train", "repair", "make-clean-set", "serve", "submit"):
        assert command in out


@pytest.mark.slow
def test_cli_repair_end_to_end(tmp_path, cifar_badnets_subject) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["make-clean-set", "--dataset", "cifar10", "--n", "300", "-o", str(tmp_path / "clean.npz")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["repair", str(cifar_badnets_subject.path / "model.safetensors"), "--data",
                              str(tmp_path / "clean.npz"), "-o", str(tmp_path / "out"), "--method", "clp",
                              "--test-data", "cifar10", "--eval-attack", str(cifar_badnets_subject.path / "subject.json")])
    assert res.exit_code == 0, res.output
    assert "before" in res.output and "after" in res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["test_before"]["asr"] > 0.9
    # per-class test accuracy: ten classes that average to the overall test accuracy (the test set is balanced)
    for when, overall in (("before", report["test_before"]["acc"]), ("after", report["test_after"]["acc"])):
        assert len(report["class_recall"][when]) == 10
        assert abs(sum(report["class_recall"][when]) / 10 - overall) < 1e-6
    assert isinstance(report["warnings"], list)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_benchmark_merge_keeps_fresh_rows_and_adds_the_rest(tmp_path) -> None:
    """Subjects benchmarked as separate jobs end up in one table: an earlier row of the same
    subject, method (or ablation variant) and seed is replaced by this run's, the others are kept."""
    from bench.compare import merge_results

    old = [{"subject": "a", "method": "onp", "seed": 0, "acc": 0.1},
           {"subject": "b", "method": "onp", "seed": 0, "acc": 0.2},
           {"subject": "a", "method": "onp", "seed": 1, "acc": 0.3}]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    fresh = [{"subject": "a", "method": "onp", "seed": 0, "acc": 0.9}]
    merged = merge_results(fresh, [path], "method")
    assert sorted((r["subject"], r["seed"], r["acc"]) for r in merged) == [("a", 0, 0.9), ("a", 1, 0.3), ("b", 0, 0.2)]
    assert fresh == [{"subject": "a", "method": "onp", "seed": 0, "acc": 0.9}], "the caller's list is not extended"
    # merging files alone (``--methods none``): a row in two files is kept once, from the first file listed
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps([{"subject": "b", "method": "onp", "seed": 0, "acc": 0.7}]))
    merged = merge_results([], [newer, path], "method")
    assert sorted((r["subject"], r["seed"], r["acc"]) for r in merged) == [("a", 0, 0.1), ("a", 1, 0.3), ("b", 0, 0.7)]


def test_benchmark_table_reports_clean_subjects_by_their_accuracy_cost(tmp_path) -> None:
    """``bench.compare --profile clean`` rows have no ASR, RA or DER (nothing was planted): the table
    shows "—" there and keeps the accuracy and pruned count, rows of two architectures on one dataset
    stay apart, and the plot falls back to the accuracy cost instead of failing on a missing DER."""
    from bench.compare import markdown, plot
    from bench.zoo import zoo_specs

    specs = zoo_specs("clean", ["cifar10", "fashion_mnist"], ["badnets"])
    assert all(s.attack is None for s in specs)
    assert {s.arch for s in specs if s.dataset == "cifar10"} == {"small_cnn", "cnn_fc", "preact_resnet18_w16"}

    def row(arch: str, acc: float) -> dict:
        return {"subject": arch, "dataset": "cifar10", "attack": "none", "arch": arch, "method": "onp", "seed": 0,
                "acc_before": 0.8, "asr_before": None, "acc": acc, "asr": None, "ra": None, "der": None,
                "pruned": 2, "seconds": 1.0}
    table = markdown([row("small_cnn", 0.79), row("preact_resnet18_w16", 0.75)], "## clean")
    assert "| cifar10 | none | small_cnn | onp | 79.00 | — | — | — | 2.0 | 1.0 |" in table
    assert "| cifar10 | none | preact_resnet18_w16 | onp | 75.00 |" in table
    assert "| onp | -3.00 ± 2.83 | — | — |" in table
    plot([row("small_cnn", 0.79)], tmp_path / "clean.png")
    assert (tmp_path / "clean.png").stat().st_size > 0


def test_zoo_table_keeps_subjects_a_partial_run_did_not_train(tmp_path) -> None:
    """``bench.zoo --datasets X`` rewrote docs/zoo.json with X's rows only (session 12); now a run
    replaces the rows of its own subjects and keeps the others."""
    from dataclasses import asdict

    from bench.zoo import merge_rows
    from onp_core.subjects import SubjectSpec

    cifar, fmnist = SubjectSpec(dataset="cifar10"), SubjectSpec(dataset="fashion_mnist", epochs=4)
    path = tmp_path / "zoo.json"
    path.write_text(json.dumps([{"spec": asdict(cifar), "acc": 0.7}, {"spec": asdict(fmnist), "acc": 0.8}]))
    merged = merge_rows(path, [{"spec": asdict(fmnist), "acc": 0.9}])
    assert sorted((r["spec"]["dataset"], r["acc"]) for r in merged) == [("cifar10", 0.7), ("fashion_mnist", 0.9)]
    assert merge_rows(tmp_path / "absent.json", [{"spec": asdict(cifar), "acc": 0.5}]) == [{"spec": asdict(cifar),
                                                                                            "acc": 0.5}]


def test_a_subject_spec_fixes_the_initial_weights(tmp_path, monkeypatch) -> None:
    """The spec's seed decides the subject: torch seeds its default generator from the OS per
    process, and an unseeded init made every CI run train a different subject (ONP's ASR after
    ranged 2.6–14.3% over eight draws). Training is skipped here; only the starting point is checked."""
    import onp_core.subjects as subjects

    monkeypatch.setattr(subjects, "train_model", lambda model, *args, **kwargs: model.eval())
    spec = subjects.SubjectSpec(dataset="fashion_mnist", attack="badnets", epochs=1)
    torch.rand(7)  # the global generator's state differs between the two calls
    first = subjects.train_subject(spec, tmp_path / "a").model.state_dict()
    second = subjects.train_subject(spec, tmp_path / "b").model.state_dict()
    other = subjects.train_subject(subjects.SubjectSpec(dataset="fashion_mnist", attack="badnets", epochs=1, seed=1),
                                   tmp_path / "c").model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the heap setting is glibc's mallopt")
def test_repeated_activation_buffers_reuse_the_heap_instead_of_faulting_fresh_pages() -> None:
    """After ``resolve_device`` a freed 64 MB tensor's pages are reused, not unmapped and faulted in again.

    Under glibc's default mmap threshold each of these 20 allocations faults in its 16k pages
    anew (measured: 327,700 faults; none with the setting). One ONP repair faulted 12.5 M pages
    without it and 0.4 M with it (docs/ONP.md, Speed).
    """
    from onp_core.device import keep_large_buffers_on_the_heap, resolve_device

    resolve_device("cpu")
    assert keep_large_buffers_on_the_heap()
    pages_per_buffer = (64 << 20) // resource.getpagesize()
    for _ in range(20):  # the heap grows to its working size in the first ones (measured: no faults after)
        torch.ones(16 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(16 << 20)  # 64 MB of float32, written, then freed
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 3 * pages_per_buffer, f"{faults} page faults for 20 reused 64 MB buffers"
