"""Trainable groups (regexes from the config), per-group learning rates, Adam with linear warmup.

config.trainable = {group: {"pattern": regex over dotted param paths, "lr": float}}

A parameter belongs to the group whose regex `fullmatch`es its path (`unet.down_blocks.1.…lora_B.kernel`,
`id_encoder.visual_projection_2.kernel`); two groups matching one path is an error, so the order of
groups never matters; a group that matches nothing is an error (a typo would otherwise freeze it
silently). Everything outside the groups is frozen: no gradient, no optimizer state, not checkpointed.

Learning rate of group g at optimizer step s (0-based): lr_g * min(1, (s + 1) / warmup_steps), then
constant. (+1: the very first update already moves, with lr_g / warmup_steps.)
"""

from __future__ import annotations

import re
from typing import Mapping

import jax
import optax


def group_of(path: str, groups: Mapping[str, Mapping]) -> str | None:
    """The trainable group whose pattern fullmatches `path` (None: frozen); ValueError when several do."""
    hits = [g for g, spec in groups.items() if re.fullmatch(spec["pattern"], path)]
    if len(hits) > 1:
        raise ValueError(f"param {path} matches several trainable groups {hits}; make their patterns disjoint")
    return hits[0] if hits else None


def check_groups(paths, groups: Mapping[str, Mapping]) -> dict[str, int]:
    """{group: number of params}; ValueError naming any group that matches no parameter."""
    counts = {g: 0 for g in groups}
    for p in paths:
        g = group_of(p, groups)
        if g is not None:
            counts[g] += 1
    empty = [g for g, n in counts.items() if n == 0]
    if empty:
        raise ValueError(
            f"trainable group(s) {empty} match no parameter (patterns: "
            f"{ {g: groups[g]['pattern'] for g in empty} }); fix config.trainable"
        )
    return counts


def warmup_factor(step, warmup_steps: int):
    """min(1, (step + 1) / warmup_steps): the learning-rate multiplier of optimizer step `step` (0-based)."""
    if warmup_steps <= 0:
        return 1.0
    return jax.numpy.minimum(1.0, (step + 1) / warmup_steps)


def make_schedule(lr: float, warmup_steps: int):
    """An optax schedule: `lr` times the linear warmup factor."""
    return lambda count: lr * warmup_factor(count, warmup_steps)


def make_optimizer(
    params: Mapping[str, jax.Array], groups: Mapping[str, Mapping], optim
) -> optax.GradientTransformation:
    """params: flat {dotted path: array} of the trainable parameters (all of them are in a group)."""
    labels = {p: group_of(p, groups) for p in params}
    txs = {
        g: optax.adam(make_schedule(float(spec["lr"]), optim.warmup_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps)
        for g, spec in groups.items()
    }
    tx = optax.multi_transform(txs, labels)
    if optim.grad_clip_norm and optim.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), tx)
    if optim.grad_accum_steps > 1:  # effective batch = global batch x grad_accum_steps
        tx = optax.MultiSteps(tx, every_k_schedule=optim.grad_accum_steps)
    return tx
