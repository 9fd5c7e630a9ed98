"""ONP's ``repair``: features → graphs → RL search over prune masks → selection on held-out data.

Time goes to (1) feature extraction (ANP and RNP mask fits, a few hundred small
gradient steps), (2) the search, one reward = two or three forward passes over the
reward split per episode, and (3) the final selection on the held-out split; the
result's ``details['timing']`` reports each.
"""
from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch
from pydantic import Field

from ...data.dataset import ImageSet
from ...device import resolve_device
from ...models import ImageClassifier
from ...neurons import prune
from ..base import DefenseConfig, ProgressCallback, RepairResult, Timer, clean_splits, report, working_copy
from .agent import Episode, policy_loss, run_episode
from .context import Batch, ModelContext
from .features import FEATURE_NAMES, compute_features, unlearn
from .gnn import PolicyValueNet
from .graph import build_graphs
from .reward import SCORES, Reward, make_score
from .synth import activation_gain, strongest_trigger, synthesize

NAME = "onp"


class Config(DefenseConfig):
    """ONP hyper-parameters; defaults are meant to hold across architectures and attacks."""

    policy: Literal["rl", "greedy"] = Field("rl", description="RL agent, or the greedy-rule ablation")
    encoder: Literal["gnn", "mlp"] = Field("gnn", description="message passing, or the MLP ablation")
    score: str = Field("synth", description=f"trigger-free backdoor score: one of {SCORES}")
    features: tuple[str, ...] = Field(FEATURE_NAMES, description="node features to use (ablation)")
    iterations: int = Field(40, ge=1, le=10_000, description="policy updates")
    episodes: int = Field(8, ge=2, le=256, description="episodes per update")
    lr: float = Field(0.02, gt=0)
    entropy_coef: float = Field(0.01, ge=0)
    value_coef: float = Field(0.5, ge=0)
    hidden: int = Field(32, ge=4, le=512)
    gnn_layers: int = Field(2, ge=1, le=6)
    initial_prune_prob: float = Field(0.01, gt=0, lt=0.5)
    lambda_b: float = Field(1.0, ge=0, description="weight of the backdoor score")
    lambda_s: float = Field(0.2, ge=0, description="weight of the fraction of neurons pruned")
    epsilon: float = Field(0.9, ge=0, lt=1, description="edge threshold: quantile of centred cosine similarity")
    delta: float = Field(0.1, ge=0, description="dormant-node threshold: ‖q‖₁ < δ × layer median gets no edges")
    perturb_eps: float = Field(0.3, gt=0, le=1, description="neuron perturbation size for the 'perturb' score")
    anp_steps: int = Field(50, ge=0, description="iterations of the ANP-mask node feature (0: off)")
    rnp_epochs: int = Field(10, ge=0, description="epochs of the RNP mask-recovery node feature (0: off)")
    synth_steps: int = Field(80, ge=10, description="optimisation steps of each trigger synthesis")
    synth_tries: int = Field(10, ge=1, description="candidate target classes (most predicted by the unlearned "
                             "model first) to synthesise a trigger for")
    synth_batch: int = Field(64, ge=8, description="images per synthesis step")
    resynth_steps: int = Field(0, ge=0, description="re-synthesis steps per shortlisted candidate at selection "
                               "(off: a re-synthesised pattern finds a new adversarial patch even after the real "
                               "backdoor is gone, measured in docs/ONP.md)")
    reward_samples: int = Field(512, ge=32, description="clean images per reward evaluation (speed)")
    top_k: int = Field(5, ge=1, description="best search candidates re-scored on the held-out split")
    max_prune_fraction: float = Field(0.1, gt=0, le=1, description="candidates pruning more are discarded")
    finetune_epochs: int = Field(0, ge=0, description="optional fine-tune on the clean data after pruning")


def _keep_key(keep: torch.Tensor) -> bytes:
    return bytes(torch.nonzero(keep == 0).flatten().to(torch.int32).numpy().tobytes())


def _greedy_candidates(features: Any, ctx: ModelContext, reward: Reward, cfg: Config) -> list[tuple[float, torch.Tensor]]:
    """Ablation: rank neurons by the same suspicion signals, sweep the count, keep the best rewards."""
    raw = features.raw
    top_gain = max(float(g.abs().max()) for g in raw["trigger_gain"]) or 1.0
    suspicion = torch.cat([(1 - a) + (1 - r) + gain / top_gain
                           for a, r, gain in zip(raw["anp_mask_abs"], raw["rnp_mask_abs"], raw["trigger_gain"])])
    order = suspicion.argsort(descending=True)
    max_k = max(1, int(cfg.max_prune_fraction * ctx.total))
    counts = sorted({max(1, round(float(v))) for v in torch.logspace(0, math.log10(max_k), 24)})
    out = []
    for k in counts:
        keep = torch.ones(ctx.total)
        keep[order[:k]] = 0
        out.append((reward(keep).reward, keep))
    return out


def _rl_candidates(graphs: list, ctx: ModelContext, reward: Reward, cfg: Config, progress: ProgressCallback | None,
                   trace: list[dict[str, Any]]) -> tuple[list[tuple[float, torch.Tensor]], torch.Tensor]:
    torch.manual_seed(cfg.seed)
    policy = PolicyValueNet(graphs[0].x.shape[1], cfg.hidden, cfg.gnn_layers, cfg.encoder == "gnn",
                            cfg.initial_prune_prob)
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


def repair(model: ImageClassifier, clean: ImageSet, config: Config | None = None,
           progress: ProgressCallback | None = None) -> RepairResult:
    """Prune the neurons ONP's learned policy marks as backdoor, using only ``clean`` data."""
    cfg = config or Config()
    if cfg.score not in SCORES:
        raise ValueError(f"unknown backdoor score {cfg.score!r}; one of {SCORES}")
    timer, timing = Timer(), {}
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = working_copy(model)
    search_set, holdout_set = clean_splits(clean, cfg)
    search, holdout = Batch.from_set(search_set, device), Batch.from_set(holdout_set, device)
    num_classes = model.manifest.num_classes
    report(progress, 0, cfg.iterations, "trace")
    t = time.perf_counter()
    ctx = ModelContext(model, device)
    report(progress, 0, cfg.iterations, "unlearn")
    unlearned = ModelContext(unlearn(ctx, search, seed=cfg.seed), device)
    timing["trace_and_unlearn"] = time.perf_counter() - t

    t = time.perf_counter()
    report(progress, 0, cfg.iterations, "synthesize")
    trigger = strongest_trigger(ctx, unlearned, search, num_classes, cfg.synth_steps, cfg.synth_tries, cfg.seed,
                                cfg.synth_batch)
    timing["synthesize"] = time.perf_counter() - t

    t = time.perf_counter()
    report(progress, 0, cfg.iterations, "features")
    features = compute_features(ctx, unlearned, search, seed=cfg.seed, anp_steps=cfg.anp_steps,
                                rnp_epochs=cfg.rnp_epochs, trigger_gain=activation_gain(ctx, trigger, search))
    graphs = build_graphs(ctx, features.select(tuple(cfg.features)), cfg.epsilon, cfg.delta)
    timing["features_and_graphs"] = time.perf_counter() - t

    n = min(len(search.x), cfg.reward_samples)
    reward_batch = Batch(search.x[:n], search.y[:n])
    reward = Reward(ctx, reward_batch, make_score(cfg.score, ctx, unlearned, reward_batch, num_classes,
                                                  cfg.perturb_eps, cfg.seed, trigger), cfg.lambda_b, cfg.lambda_s)
    t = time.perf_counter()
    trace: list[dict[str, Any]] = []
    if cfg.policy == "rl":
        candidates, greedy = _rl_candidates(graphs, ctx, reward, cfg, progress, trace)
        candidates.append((reward(greedy).reward, greedy))
    else:
        candidates = _greedy_candidates(features, ctx, reward, cfg)
    timing["search"] = time.perf_counter() - t

    t = time.perf_counter()
    report(progress, cfg.iterations, cfg.iterations, "select")
    unpruned = torch.ones(ctx.total)
    shortlist = sorted(candidates, key=lambda c: c[0], reverse=True)[:cfg.top_k] + [(0.0, unpruned)]
    scored = []
    for _, keep in shortlist:
        # Re-synthesise the trigger against each candidate: a mask that merely breaks the
        # one pattern found before, but leaves the shortcut, is caught here.
        cand_trigger = trigger
        if cfg.score == "synth" and cfg.resynth_steps:
            cand_trigger = synthesize(ctx, search, trigger.target, cfg.resynth_steps, keep=keep, init=trigger,
                                      seed=cfg.seed + 1)
        holdout_reward = Reward(ctx, holdout, make_score(cfg.score, ctx, unlearned, holdout, num_classes,
                                                         cfg.perturb_eps, cfg.seed, cand_trigger),
                                cfg.lambda_b, cfg.lambda_s)
        scored.append((holdout_reward(keep), keep))
    best_info, best_keep = max(scored, key=lambda s: s[0].reward)
    timing["select"] = time.perf_counter() - t

    before_info = scored[-1][0]  # the unpruned model is always the last candidate
    acc_before = before_info.acc
    pruned_idx = {i: torch.nonzero(m == 0).flatten().tolist() for i, m in enumerate(ctx.split_flat(best_keep))}
    pruned_idx = {i: v for i, v in pruned_idx.items() if v}
    prune(model, ctx.neurons, pruned_idx)
    if cfg.finetune_epochs:
        from ..common_finetune import finetune_keep_pruned

        finetune_keep_pruned(model, ctx.neurons, pruned_idx, search_set, cfg.finetune_epochs, device, cfg.seed)
    model = model.cpu().eval()
    acc_after = ModelContext(model, torch.device("cpu"), ctx.neurons).accuracy(None, Batch.from_set(holdout_set, torch.device("cpu"))) \
        if cfg.finetune_epochs else best_info.acc
    pruned = {ctx.neurons.layers[i].name: v for i, v in pruned_idx.items()}
    details = {
        "timing": {k: round(v, 2) for k, v in timing.items()},
        "reward_calls": reward.calls + len(scored),
        "synthesized_trigger": {"target": trigger.target, "success": trigger.success, "mask_l1": trigger.mask_l1},
        "selected": {"reward": best_info.reward, "acc": best_info.acc, "backdoor_score": best_info.backdoor,
                     "fraction_pruned": best_info.frac},
        "backdoor_score_before": before_info.backdoor,
        "candidates": [{"reward": s.reward, "acc": s.acc, "backdoor_score": s.backdoor, "fraction": s.frac}
                       for s, _ in scored],
        "neurons_total": ctx.total,
        "layers": [{"name": l.name, "size": l.size, "pruned": len(pruned_idx.get(i, []))}
                   for i, l in enumerate(ctx.neurons.layers)],
    }
    report(progress, cfg.iterations, cfg.iterations, "done")
    return RepairResult(model=model, method=NAME, pruned=pruned, clean_acc_before=acc_before,
                        clean_acc_after=acc_after, seconds=timer.seconds, trace=trace, details=details)
