"""ONP's ``repair``: triggers → effects → features → graphs → RL search → selection on held-out data → dormant sweep.

Time goes to (1) the all-class trigger synthesis (``synth_steps`` batched steps), (2)
the per-neuron leave-one-out effects (batched per-sample masks), (3) the search, one
reward = a forward over the reward split and one over its triggered copies per
episode, and (4) the final selection on the held-out split; ``details['timing']``
reports each. When no class's synthesised trigger is anomalous the model shows no
trigger evidence and the search is skipped. The dormant sweep (``dormant.py``) runs
either way: it is the trigger-free check for a backdoor no synthesised trigger exposes,
and it may change at most ``dormant_flips`` of the clean predictions after a search that
pruned, ``dormant_flips_alone`` when the search pruned nothing.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field

from ...data.dataset import ImageSet
from ...device import resolve_device, use_bf16
from ...models import ImageClassifier
from ...neurons import prune
from ..base import DefenseConfig, ProgressCallback, RepairResult, Timer, clean_splits, report, working_copy
from ..common import FinetuneSettings, Tensors, accuracy_of, crop_padding, finetune_keeping_pruned
from .agent import Episode, imitate, policy_loss, prior_probabilities, run_episode
from .breakability import weigh_by_breakability
from .context import Batch, ModelContext
from .dormant import dormant_sweep
from .effects import neuron_effects
from .families import FAMILIES
from .features import FEATURE_NAMES, anp_masks, compute_features, rnp_masks, unlearn
from .gnn import PolicyValueNet
from .graph import build_graphs
from .joint import joint_mask_scores
from .reattack import reattack
from .reward import SCORES, Reward, make_score
from .synth import Spread, TriggerSet, activation_gain, stamp_some, synthesize_triggers

NAME = "onp"
# The dormant sweep's budget (docs/ONP.md §1u). After a search pruned something it is a light touch, 2 of 500 clean
# predictions: on eleven repaired cpu-profile runs it pruned one neuron once (−0.09 points), where 1% cost 0.26 points of
# accuracy per run for 0.29 of ASR. With nothing pruned by the search it is the only defense and gets 2%: on the unrepaired subjects it took
# CIFAR-10 SIG 90.7 → 0.0%, FMNIST WaNet 99.3 → 6.6% and CIFAR-10 BadNets 96.0 → 39.4 / 10.8% for ≤ 0.3 points, and it
# pruned nothing on a clean FMNIST model (one neuron under the activation bar).
DORMANT_FLIPS = 0.004
DORMANT_FLIPS_ALONE = 0.02
# Candidates per layer: its three least active neurons under the bar (session 23, docs/ONP.md §1v). On the network
# without BN (cnn_fc) a quarter of the neurons sit under the bar, most of them dead ReLU units, and the sweep pruned
# 32–59 of 224 neurons from clean models (9 with this cap). FMNIST WaNet's backdoor neuron is its layer's second
# quietest (one per layer loses it: 32.8 → 94.7% ASR), so three leaves a margin; on the BN networks measured two and
# three prune the same neurons as no cap, and CIFAR-10 SIG still goes (90.6 → 0.00%).
DORMANT_PER_LAYER = 3
DEFAULT_FEATURES = tuple(f for f in FEATURE_NAMES if f not in ("anp_mask", "rnp_mask"))


class Config(DefenseConfig):
    """ONP hyper-parameters; defaults are meant to hold across architectures and attacks."""

    policy: Literal["rl", "greedy"] = Field("rl", description="RL agent, or the greedy-rule ablation")
    encoder: Literal["gnn", "mlp"] = Field("gnn", description="message passing, or the MLP ablation")
    score: str = Field("synth", description=f"trigger-free backdoor score: one of {SCORES}")
    features: tuple[str, ...] = Field(DEFAULT_FEATURES, description=f"node features to use (ablation); of {FEATURE_NAMES}")
    iterations: int = Field(15, ge=1, le=10_000, description="policy updates")
    episodes: int = Field(16, ge=2, le=256, description="episodes per update")
    lr: float = Field(0.003, gt=0, description="Adam step of the policy (larger steps undo the imitation prior in one update)")
    entropy_coef: float = Field(0.01, ge=0)
    value_coef: float = Field(0.5, ge=0)
    hidden: int = Field(32, ge=4, le=512)
    gnn_layers: int = Field(2, ge=1, le=6)
    initial_prune_count: float = Field(2.0, gt=0, description="expected neurons pruned per episode at the start "
                                       "(without imitation)")
    imitation_steps: int = Field(100, ge=0, description="behaviour-cloning steps towards the leave-one-out prior "
                                 "before RL (0: start from a uniform policy)")
    lambda_b: float = Field(4.0, ge=0, description="weight of the backdoor score (2 → 4 measured: CIFAR-10 BadNets "
                            "DER 90.2 → 93.8, the other five subjects within 0.3, docs/BENCHMARKS.md)")
    score_relative: bool = Field(False, description="divide each suspect's synthesised-trigger score by the share "
                                 "of its class's clean confidence a candidate keeps, so erasing the class buys nothing "
                                 "(reward.py, docs/ONP.md §1p)")
    lambda_s: float = Field(0.2, ge=0, description="weight of the fraction of neurons pruned")
    max_flips: float = Field(0.03, ge=0, le=1, description="share of clean predictions a candidate may change "
                             "before the steep penalty starts")
    lambda_drop: float = Field(10.0, ge=0, description="slope of the penalty on prediction changes beyond max_flips")
    max_class_loss: float = Field(1.0, ge=0, le=1, description="share of one class's clean predictions a candidate "
                                  "may move elsewhere before the same slope applies (1: off; 0.25 and 0.5 stopped "
                                  "a held-out repair from erasing its target class but lost DER there and on "
                                  "BadNets, docs/ONP.md §1m)")
    epsilon: float = Field(0.9, ge=0, lt=1, description="edge threshold: quantile of centred cosine similarity")
    delta: float = Field(0.1, ge=0, description="dormant-node threshold: ‖q‖₁ < δ × layer median gets no edges")
    perturb_eps: float = Field(0.3, gt=0, le=1, description="neuron perturbation size for the 'perturb' score")
    anp_steps: int = Field(0, ge=0, description="iterations of the ANP-mask node feature (0: off)")
    rnp_epochs: int = Field(0, ge=0, description="epochs of the RNP mask-recovery node feature (0: off)")
    synth_steps: int = Field(100, ge=10, description="optimisation steps of the all-class trigger synthesis")
    synth_restarts: int = Field(2, ge=1, le=8, description="independent syntheses per class, the smallest kept "
                                "(a single restart missed the planted trigger in 1 of 12 measured runs, docs/ONP.md)")
    mask_restarts: int = Field(4, ge=1, le=16, description="restarts of the mask (patch) family, which lands in a "
                               "natural ~45 px minimum on a third of its restarts on a residual network: 2 missed "
                               "the planted patch in 1 of 9 repairs, docs/ONP.md §1r")
    synth_per_class: int = Field(8, ge=2, description="images per class per synthesis step")
    synth_families: tuple[Literal["mask", "blend", "warp"], ...] = Field(
        FAMILIES, min_length=1, description="trigger families searched: local patches, full-image blends, smooth "
        "warps (mask alone missed the Blended and WaNet subjects, docs/ONP.md)")
    anomaly_low: float = Field(1.5, description="anomaly index (robust z of −log cost) at which a class starts to count")
    anomaly_high: float = Field(2.5, description="anomaly index at which a class counts fully")
    anomaly_min_spread: float = Field(0.5, gt=0, description="floor on the anomaly index's spread (log-cost units)")
    anomaly_spread: Spread = Field(
        "all", description="the anomaly index's MAD over all classes, or over those at or below the median only "
        "(a one-sided spread: it flagged a weak CIFAR-10 WaNet that 'all' misses, and a natural class of the SIG "
        "subject too, whose search then left SIG at 57–76%; not adopted, docs/ONP.md §1z)")
    breakability: bool = Field(True, description="scale each secondary suspect's weight by how cheaply pruning its "
                               "top ≤ 3 neurons halves its target probability; the most breakable suspect keeps its "
                               "weight (breakability.py; natural shortcuts cannot be cut without wrecking the model, "
                               "docs/ONP.md §1g)")
    halving_flips_low: float = Field(0.15, ge=0, le=1, description="share of flipped clean predictions up to which "
                                     "a suspect keeps its full weight")
    halving_flips_high: float = Field(0.30, ge=0, le=1, description="… from which it gets no weight")
    joint_mask: Literal["off", "candidates", "prior", "both"] = Field(
        "off", description="a soft mask over all neurons optimised against the suspects' triggers with the clean "
        "predictions held (joint.py): its ranking swept as extra candidates, mixed into the imitation prior, or both")
    joint_steps: int = Field(100, ge=0, description="Adam steps of the joint mask")
    effect_neurons: int = Field(64, ge=0, description="neurons whose leave-one-out effect is measured exactly")
    effect_images: int = Field(96, ge=16, description="clean images per leave-one-out measurement")
    reward_samples: int = Field(512, ge=32, description="clean images per reward evaluation (speed)")
    top_k: int = Field(5, ge=1, description="best search candidates re-scored on the held-out split")
    max_prune_fraction: float = Field(0.1, gt=0, le=1, description="candidates pruning more are discarded")
    rounds: int = Field(1, ge=1, le=10, description="synthesise → search → prune rounds, while a class stays anomalous")
    reattack_rounds: int = Field(1, ge=0, le=10, description="after a round's pruning: re-optimise the suspects' "
                                 "triggers on the pruned network within their cost budget and search again "
                                 "(docs/ONP.md §1e)")
    reattack_budget: float = Field(1.0, gt=0, description="re-attacked trigger's cost limit, × its synthesised cost "
                                   "(2 pruned 9 neurons on FMNIST BadNets, −3.8 ACC; 1: 4 neurons, −1.1; docs/ONP.md §1e)")
    reattack_steps: int = Field(50, ge=1, description="Adam steps of each re-attack")
    reattack_rivals: int = Field(2, ge=0, le=10, description="natural classes each suspect's re-attack is compared "
                                 "with; its weight is scaled by its relative excess hit rate (1 − rival/suspect) and "
                                 "the round is skipped when no suspect has any (0: no comparison; reattack.py, "
                                 "docs/ONP.md §1i)")
    reattack_drop_factor: float = Field(3.0, ge=1, description="the re-attack round's flip-penalty slope, × "
                                        "lambda_drop (× 10 left FMNIST BadNets at 15.6% ASR, docs/ONP.md §1e; × 3 "
                                        "kept 4.4 and 1.6 points on FMNIST Blended, the rest unchanged, §1g)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="precision of the search's gradient-free forwards (rewards, effects): auto = bf16 where "
        "the hardware runs it natively (AVX512-BF16/AMX CPUs, GPUs); CIFAR-10 small-CNN repair 65.7 → 43.0 s, docs/ONP.md")
    dormant_flips: float = Field(DORMANT_FLIPS, ge=0, le=1, description="after a search that pruned something: share "
                                 "of clean predictions the dormant sweep may change by pruning neurons the clean data "
                                 "barely uses (0: off; dormant.py, docs/ONP.md §1u)")
    dormant_flips_alone: float = Field(DORMANT_FLIPS_ALONE, ge=0, le=1, description="… when the search pruned nothing "
                                       "(no trigger evidence): the sweep is then the only defense (0: off)")
    dormant_alpha: float = Field(0.5, ge=0, description="the dormant sweep's candidates: mean clean activation below "
                                 "this × their layer's mean")
    dormant_per_layer: int | None = Field(DORMANT_PER_LAYER, ge=1, description="… and at most this many per layer, "
                                          "its least active ones (null: every neuron under the bar)")
    finetune_epochs: int = Field(0, ge=0, description="optional fine-tune on the clean data after pruning")
    finetune_unlearn: float = Field(0.2, ge=0, lt=1, description="share of fine-tuning images stamped with a suspect "
                                    "class's synthesised trigger, true labels kept (Neural Cleanse's unlearning)")


def _keep_key(keep: torch.Tensor) -> bytes:
    return bytes(torch.nonzero(keep == 0).flatten().to(torch.int32).numpy().tobytes())


def _ranked_candidates(scores: torch.Tensor, ctx: ModelContext, reward: Reward, cfg: Config
                       ) -> list[tuple[float, torch.Tensor]]:
    """Prune the top-k neurons of ``scores`` for k swept log-spaced up to the prune limit; every reward is kept.

    The greedy ablation sweeps the leave-one-out drop; ``joint_mask`` sweeps the joint mask's scores.
    """
    order = scores.argsort(descending=True)
    max_k = max(1, int(cfg.max_prune_fraction * ctx.total))
    counts = sorted({max(1, round(float(v))) for v in torch.logspace(0, math.log10(max_k), 24)})
    out = []
    for k in counts:
        keep = torch.ones(ctx.total)
        keep[order[:k]] = 0
        out.append((reward(keep).reward, keep))
    return out


def _rl_candidates(graphs: list, ctx: ModelContext, reward: Reward, cfg: Config, prior: torch.Tensor | None,
                   progress: ProgressCallback | None, trace: list[dict[str, Any]]
                   ) -> tuple[list[tuple[float, torch.Tensor]], torch.Tensor]:
    torch.manual_seed(cfg.seed)
    initial_prob = min(0.2, max(1e-4, cfg.initial_prune_count / ctx.total))
    policy = PolicyValueNet(graphs[0].x.shape[1], cfg.hidden, cfg.gnn_layers, cfg.encoder == "gnn", initial_prob)
    if prior is not None:
        imitate(policy, graphs, prior, cfg.imitation_steps)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    seen: dict[bytes, tuple[float, torch.Tensor]] = {}
    for it in range(cfg.iterations):
        episodes: list[Episode] = [run_episode(policy, graphs, ctx.total, g) for _ in range(cfg.episodes)]
        infos = []
        for ep in episodes:
            key = _keep_key(ep.keep)
            if key in seen:
                infos.append(seen[key][0])
                continue
            info = reward(ep.keep)
            if info.frac <= cfg.max_prune_fraction:
                seen[key] = (info.reward, ep.keep)
            infos.append(info.reward)
        returns = torch.tensor(infos)
        loss = policy_loss(episodes, returns, cfg.entropy_coef, cfg.value_coef)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 5.0)
        opt.step()
        best = max(seen.values(), key=lambda t: t[0])[0] if seen else float("nan")
        mean_pruned = float(sum(int((ep.keep == 0).sum()) for ep in episodes)) / len(episodes)
        trace.append({"step": it + 1, "reward_mean": float(returns.mean()), "reward_best": best,
                      "mean_pruned": mean_pruned})
        report(progress, it + 1, cfg.iterations, "search", reward=round(float(returns.mean()), 4),
               best=round(best, 4), pruned=round(mean_pruned, 1))
    with torch.no_grad():
        greedy = run_episode(policy, graphs, ctx.total, None, greedy=True).keep
    return list(seen.values()), greedy


def _pool(search_reward: float, holdout_reward: float, n_s: int, n_h: int) -> float:
    """The reward over both clean splits, each weighted by its number of images."""
    return (n_s * search_reward + n_h * holdout_reward) / (n_s + n_h)


def _minimise(keep: torch.Tensor, value: float, reward: Reward, holdout_reward: Reward, n_s: int, n_h: int
              ) -> torch.Tensor:
    """Un-prune, one at a time, every neuron whose return does not lower the pooled reward.

    The search keeps whatever rode along with the neurons that mattered; each extra
    pruned neuron is collateral damage the clean data can only partly see.
    """
    keep = keep.clone()
    for i in torch.nonzero(keep == 0).flatten().tolist():
        trial = keep.clone()
        trial[i] = 1
        v = _pool(reward(trial).reward, holdout_reward(trial).reward, n_s, n_h)
        if v >= value:
            keep, value = trial, v
    return keep


def _search_round(ctx: ModelContext, search: Batch, holdout: Batch, references: tuple[torch.Tensor, torch.Tensor],
                  triggers: Any, cfg: Config, progress: ProgressCallback | None, trace: list[dict[str, Any]],
                  timing: dict[str, float], lambda_drop: float | None = None) -> dict[str, Any]:
    """Effects → features → graphs → RL (or greedy) search → selection, against one trigger set.

    ``lambda_drop`` overrides the flip-penalty slope (a re-attack round's is × ``reattack_drop_factor``).
    """
    lambda_drop = cfg.lambda_drop if lambda_drop is None else lambda_drop
    num_classes = ctx.model.manifest.num_classes
    t = time.perf_counter()
    report(progress, 0, cfg.iterations, "features")
    unlearned_cache: list[ModelContext] = []

    def unlearned() -> ModelContext:
        if not unlearned_cache:
            unlearned_cache.append(ModelContext(unlearn(ctx, search, seed=cfg.seed), ctx.device, bf16=ctx.bf16))
        return unlearned_cache[0]

    effects = neuron_effects(ctx, triggers, search, cfg.effect_neurons, cfg.effect_images)
    anp = anp_masks(ctx, search, steps=cfg.anp_steps, seed=cfg.seed) if cfg.anp_steps else None
    rnp = rnp_masks(unlearned(), search, epochs=cfg.rnp_epochs, seed=cfg.seed) if cfg.rnp_epochs else None
    features = compute_features(ctx, search, effects, activation_gain(ctx, triggers, search), anp, rnp)
    graphs = build_graphs(ctx, features.select(tuple(cfg.features)), cfg.epsilon, cfg.delta)
    timing["features_and_graphs"] = timing.get("features_and_graphs", 0.0) + time.perf_counter() - t

    # the joint mask only where something reads it: 100 forward-backward steps, a large share of a small repair
    joint_prior = cfg.joint_mask in ("prior", "both") and cfg.policy == "rl" and cfg.imitation_steps > 0
    joint_candidates = cfg.joint_mask in ("candidates", "both")
    joint = None
    if joint_prior or joint_candidates:
        t = time.perf_counter()
        joint = joint_mask_scores(ctx, triggers, search, cfg.joint_steps, images=cfg.effect_images)
        timing["joint_mask"] = timing.get("joint_mask", 0.0) + time.perf_counter() - t

    def reward_on(batch: Batch, reference: torch.Tensor) -> Reward:
        score = make_score(cfg.score, ctx, batch, num_classes, triggers, unlearned, cfg.perturb_eps, cfg.seed,
                           cfg.score_relative)
        return Reward(ctx, batch, score, cfg.lambda_b, cfg.lambda_s, cfg.max_flips, lambda_drop, reference,
                      cfg.max_class_loss)

    n = min(len(search.x), cfg.reward_samples)
    reward_batch = Batch(search.x[:n], search.y[:n])
    reward = reward_on(reward_batch, references[0][:n])
    t = time.perf_counter()
    if cfg.policy == "rl":
        prior = (prior_probabilities(effects.backdoor_drop, joint if joint_prior else None)
                 if cfg.imitation_steps else None)
        candidates, greedy = _rl_candidates(graphs, ctx, reward, cfg, prior, progress, trace)
        candidates.append((reward(greedy).reward, greedy))
    else:
        candidates = _ranked_candidates(effects.backdoor_drop, ctx, reward, cfg)
    if joint is not None and joint_candidates:
        candidates += _ranked_candidates(joint, ctx, reward, cfg)
    timing["search"] = timing.get("search", 0.0) + time.perf_counter() - t

    t = time.perf_counter()
    report(progress, cfg.iterations, cfg.iterations, "select")
    unpruned = torch.ones(ctx.total)
    shortlist = sorted(candidates, key=lambda c: c[0], reverse=True)[:cfg.top_k] + [(reward(unpruned).reward, unpruned)]
    holdout_reward = reward_on(holdout, references[1])
    scored = [(holdout_reward(keep), keep) for _, keep in shortlist]
    # The held-out split alone is ~100 images (±4 points of accuracy noise); the pooled
    # estimate over both clean splits ranks the shortlist, the held-out numbers are reported.
    n_s, n_h = len(reward_batch.y), len(holdout.y)
    pooled = [_pool(search_r, held.reward, n_s, n_h) for (search_r, _), (held, _) in zip(shortlist, scored)]
    best_at = max(range(len(scored)), key=lambda i: pooled[i])
    best_keep = _minimise(scored[best_at][1], pooled[best_at], reward, holdout_reward, n_s, n_h)
    timing["select"] = timing.get("select", 0.0) + time.perf_counter() - t
    return {"keep": best_keep, "info": holdout_reward(best_keep), "before": scored[-1][0],
            "reward_calls": reward.calls + holdout_reward.calls,
            "candidates": [{"reward": s.reward, "pooled_reward": p, "acc": s.acc, "backdoor_score": s.backdoor,
                            "fraction": s.frac} for (s, _), p in zip(scored, pooled)]}


def _prune_keep(keep: torch.Tensor, model: ImageClassifier, ctx: ModelContext, pruned_idx: dict[int, list[int]]
                ) -> dict[int, list[int]]:
    """Prune the neurons a flat keep-mask drops beyond those already pruned; record them in ``pruned_idx``.

    Returns what was newly pruned, per neuron layer (empty layers left out).
    """
    new = {i: torch.nonzero(m == 0).flatten().tolist() for i, m in enumerate(ctx.split_flat(keep))}
    new = {i: [c for c in v if c not in pruned_idx.get(i, [])] for i, v in new.items()}
    new = {i: v for i, v in new.items() if v}
    if new:
        prune(model, ctx.neurons, new)
        for i, v in new.items():
            pruned_idx[i] = sorted(set(pruned_idx.get(i, [])) | set(v))
    return new


def _prune_found(found: dict[str, Any], info: dict[str, Any], model: ImageClassifier, ctx: ModelContext,
                 pruned_idx: dict[int, list[int]]) -> bool:
    """Prune what a search round selected beyond what is already pruned; False when that is nothing."""
    new = _prune_keep(found["keep"], model, ctx, pruned_idx)
    sel = found["info"]
    info.update({"pruned": sum(len(v) for v in new.values()), "reward_calls": found["reward_calls"],
                 "selected": {"reward": sel.reward, "acc": sel.acc, "backdoor_score": sel.backdoor},
                 "backdoor_score_before": found["before"].backdoor, "candidates": found["candidates"]})
    return bool(new)


def synthesize_as_configured(ctx: ModelContext, search: Batch, num_classes: int, cfg: Config, round_index: int = 0,
                             on_step: Callable[[str, int, int], None] | None = None) -> TriggerSet:
    """Round ``round_index``'s trigger synthesis with every synthesis setting ``cfg`` holds.

    ``repair`` calls it, and so do the diagnostic scripts that must see what a repair saw: a script that
    passed the arguments itself once left two of them at defaults that could drift from the config's.
    """
    return synthesize_triggers(ctx, search, num_classes, cfg.synth_steps, cfg.synth_per_class, cfg.seed + round_index,
                               cfg.anomaly_low, cfg.anomaly_high, restarts=cfg.synth_restarts,
                               mask_restarts=cfg.mask_restarts, min_spread=cfg.anomaly_min_spread,
                               families=cfg.synth_families, on_step=on_step, spread=cfg.anomaly_spread)


def repair(model: ImageClassifier, clean: ImageSet, config: Config | None = None,
           progress: ProgressCallback | None = None) -> RepairResult:
    """Prune the neurons ONP's learned policy marks as backdoor, using only ``clean`` data.

    Rounds: after a round's pruning, triggers are synthesised afresh on the pruned model;
    while a class is still anomalous, another round searches against the new triggers
    (a fixed synthesised trigger stops carrying signal once it is broken, even when
    the real backdoor is only partly cut — measured on CIFAR-10, docs/ONP.md).
    Within a round, after its pruning, ``reattack_rounds`` follow-up searches run against
    the suspects' triggers re-optimised on the pruned network within their synthesised
    cost (``reattack.py``, docs/ONP.md §1e).
    """
    cfg = config or Config()
    if cfg.score not in SCORES:
        raise ValueError(f"unknown backdoor score {cfg.score!r}; one of {SCORES}")
    unknown = set(cfg.features) - set(FEATURE_NAMES)
    if unknown:
        raise ValueError(f"unknown node features {sorted(unknown)}; of {FEATURE_NAMES}")
    timer, timing = Timer(), {}
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = working_copy(model)
    search_set, holdout_set = clean_splits(clean, cfg)
    search, holdout = Batch.from_set(search_set, device), Batch.from_set(holdout_set, device)
    num_classes = model.manifest.num_classes
    report(progress, 0, cfg.iterations, "trace")
    t = time.perf_counter()
    ctx = ModelContext(model, device, bf16=use_bf16(cfg.precision, device))
    neurons = ctx.neurons
    timing["trace"] = time.perf_counter() - t
    references = (ctx.logits(None, search.x).argmax(1), ctx.logits(None, holdout.x).argmax(1))
    acc_before = ctx.accuracy(None, holdout)

    trace: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    pruned_idx: dict[int, list[int]] = {}
    triggers_seen: list[TriggerSet] = []
    for r in range(cfg.rounds):
        t = time.perf_counter()
        report(progress, 0, cfg.iterations, "synthesize", round=r + 1)
        triggers = synthesize_as_configured(ctx, search, num_classes, cfg, r,
                                            on_step=lambda fam, done, total, r=r: report(
                                                progress, 0, cfg.iterations, "synthesize", round=r + 1, family=fam,
                                                synth_step=f"{done}/{total}"))
        timing["synthesize"] = timing.get("synthesize", 0.0) + time.perf_counter() - t
        anomalous = triggers.suspects
        halving: dict[int, float] = {}
        if cfg.breakability and anomalous:
            t = time.perf_counter()
            triggers, halving = weigh_by_breakability(ctx, triggers, search, references[0], cfg.halving_flips_low,
                                                      cfg.halving_flips_high)
            timing["breakability"] = timing.get("breakability", 0.0) + time.perf_counter() - t
        triggers_seen.append(triggers)
        info: dict[str, Any] = {"round": r + 1, "triggers": triggers.summary(), "suspects": triggers.suspects,
                                "anomalous": anomalous, "halving_flips": {k: round(v, 3) for k, v in halving.items()}}
        rounds.append(info)
        if not triggers.suspects and cfg.score == "synth":
            info["verdict"] = "no class's synthesised trigger is anomalously cheap"
            break
        found = _search_round(ctx, search, holdout, references, triggers, cfg, progress, trace, timing)
        if not _prune_found(found, info, model, ctx, pruned_idx):
            break
        for a in range(cfg.reattack_rounds if cfg.score == "synth" else 0):
            t = time.perf_counter()
            report(progress, 0, cfg.iterations, "reattack", round=r + 1)
            suspects_before = triggers.suspects
            triggers, evidence = reattack(ctx, triggers, search, cfg.reattack_steps, cfg.reattack_budget,
                                          rivals=cfg.reattack_rivals,
                                          on_step=lambda done, total, r=r: report(
                                              progress, 0, cfg.iterations, "reattack", round=r + 1,
                                              reattack_step=f"{done}/{total}"))
            timing["reattack"] = timing.get("reattack", 0.0) + time.perf_counter() - t
            follow: dict[str, Any] = {"round": r + 1, "reattack": a + 1,
                                      "reattack_success": {k: round(float(triggers.success[k]), 3)
                                                           for k in suspects_before},
                                      "evidence": evidence}
            info.setdefault("reattacks", []).append(follow)
            if not triggers.suspects:
                follow["verdict"] = "no suspect's re-attacked trigger beats the natural classes"
                break
            found = _search_round(ctx, search, holdout, references, triggers, cfg, progress, trace, timing,
                                  cfg.lambda_drop * cfg.reattack_drop_factor)
            if not _prune_found(found, follow, model, ctx, pruned_idx):
                break
        # no re-trace: the masked graph shares the model's parameters, so the next round sees the pruned weights

    searched = bool(pruned_idx)
    dormant = None
    budget = cfg.dormant_flips if searched else cfg.dormant_flips_alone
    if budget > 0:
        t = time.perf_counter()
        report(progress, cfg.iterations, cfg.iterations, "dormant sweep")
        everything = Batch(torch.cat([search.x, holdout.x]), torch.cat([search.y, holdout.y]))
        sweep = dormant_sweep(ctx, everything, cfg.dormant_alpha, budget, per_layer=cfg.dormant_per_layer)
        new = _prune_keep(sweep.keep, model, ctx, pruned_idx)
        dormant = {"pruned": {neurons.layers[i].name: v for i, v in new.items()}, "flips": round(sweep.flips, 4),
                   "budget": budget, "candidates": sweep.candidates}
        timing["dormant"] = time.perf_counter() - t

    acc_after = ctx.accuracy(None, holdout)
    finetune_undone = None
    if cfg.finetune_epochs and pruned_idx:
        t = time.perf_counter()
        search_t, held_t = Tensors.of(search_set, device), Tensors.of(holdout_set, device)
        finetune_undone = finetune_keeping_pruned(model, neurons, pruned_idx, search_t, held_t, FinetuneSettings(
            epochs=cfg.finetune_epochs, seed=cfg.seed + 1, padding=crop_padding(model.manifest.input_shape)),
            trace, progress, stamp_some(triggers_seen, cfg.finetune_unlearn, cfg.seed))
        # the model itself, not the traced graph: training updated BN running statistics,
        # which the traced graph keeps from the time it was traced
        acc_after = accuracy_of(model, held_t)
        timing["finetune"] = time.perf_counter() - t
    model = model.cpu().eval()
    pruned = {neurons.layers[i].name: v for i, v in pruned_idx.items()}
    details = {
        "timing": {k: round(v, 2) for k, v in timing.items()},
        "precision": "bf16" if ctx.bf16 else "fp32",
        "reward_calls": sum(x.get("reward_calls", 0) for x in rounds),
        "rounds": rounds,
        "triggers": rounds[0]["triggers"],
        "suspects": rounds[0]["suspects"],
        "verdict": (f"no backdoor evidence: {rounds[0]['verdict']}" if not searched and "verdict" in rounds[0]
                    else None),
        "dormant": dormant,
        "neurons_total": ctx.total,
        "finetune_undone": finetune_undone,
        "layers": [{"name": l.name, "size": l.size, "pruned": len(pruned_idx.get(i, []))}
                   for i, l in enumerate(neurons.layers)],
    }
    report(progress, cfg.iterations, cfg.iterations, "done")
    return RepairResult(model=model, method=NAME, pruned=pruned, clean_acc_before=acc_before,
                        clean_acc_after=acc_after, seconds=timer.seconds, trace=trace, details=details)
