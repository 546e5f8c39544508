"""SDXL sampling with PhotoMaker ID embeddings and split-prompt conditions, one compiled loop.

    latents  ~ N(0, 1) per seed                                   [S, h, w, 4]
    for i in range(num_steps):                                    (lax.fori_loop, no Python dispatch)
        emb   = text_only if i <= start_merge_step else id_fused  (PhotoMaker v1: the ID tokens join late)
        eps_u, eps_c = unet([x, x], t_i, [negative, emb], conditions)      classifier-free guidance
        eps   = eps_u + guidance_scale * (eps_c - eps_u)
        x     = scheduler.step(eps, i, x)
    images = vae.decode(x / scaling_factor + shift_factor)

The unconditional half sees the negative prompt and no adapter conditions (their
scale is 0 there): guidance pushes away from "no background / body / identity
condition", as the research trains with each condition dropped at p=0.1.
A gated adapter condition (`Conditioning.gated`: the identity, `conditions.Condition.gated`), like the
fused ID tokens, is applied after step `start_merge_step` (PhotoMaker v1's `i <= start_merge_step` rule).

Spatial control (`Conditioning.controls`, one `ControlConditioning` per ControlNet module given to
`denoise` / `make_sampler`): at each step every ControlNet sees the same latents, timestep and pooled text
as the UNet, the prompt *without* the ID tokens (PhotoMaker's ControlNet pipeline), and its control image
(both CFG halves); its residuals, times `scale * keep[i]` (keep: diffusers' control_guidance_start/end rule,
`control_keep`), are summed over the ControlNets (diffusers' MultiControlNetModel) and added to the UNet's
skips and mid block. A ControlNet whose keep is 0 at a step is not run at that step (lax.cond).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@flax.struct.dataclass
class ControlConditioning:
    """One ControlNet's input: image [1, H, W, 3] in [0, 1] at the output size (shared by all seeds), its
    conditioning scale, and the fractions of the steps where it acts (diffusers' control_guidance_start/end)."""

    image: jax.Array
    scale: jax.Array
    # Leaves, not static fields: new fractions do not recompile (only `control_keep`, on the host, reads them).
    start: float | jax.Array = 0.0
    end: float | jax.Array = 1.0


def control_keep(controls: Sequence[ControlConditioning], num_steps: int) -> jax.Array:
    """[len(controls), num_steps] float32: 1 where the ControlNet acts at step i, else 0, computed on the host
    in float64 exactly as diffusers' pipelines do: keep = 1 - (i / n < start or (i + 1) / n > end)."""
    bounds = [(float(c.start), float(c.end)) for c in controls]
    keep = np.array(
        [[1.0 - float(i / num_steps < a or (i + 1) / num_steps > b) for i in range(num_steps)] for a, b in bounds],
        np.float32,
    ).reshape(len(controls), num_steps)
    return jnp.asarray(keep)


@flax.struct.dataclass
class Conditioning:
    """Everything the loop needs besides the latents; arrays have a leading batch of 1 (shared by all seeds).

    prompt_embeds / pooled: the prompt with the ID tokens fused in (or the plain prompt).
    text_only_embeds / text_only_pooled: the prompt without the trigger word (steps <= start_merge_step).
    negative_embeds / negative_pooled: the unconditional branch.
    time_ids: [1, 6] SDXL (original size, crop top-left, target size).
    conditions: {name: [1, S, D]} adapter inputs (text condition tokens, identity tokens).
    condition_scales: {name: scalar} scale of each adapter condition.
    gated: names of the conditions that join only after start_merge_step (static).
    controls: one ControlConditioning per ControlNet given to `denoise` (same order).
    t2i_features: a T2I-Adapter's features [1, h_i, w_i, C_i], already times adapter_conditioning_scale,
        added by the UNet (`down_intrablock_additional_residuals`) at steps i < t2i_steps
        (= int(num_steps * adapter_conditioning_factor), diffusers' rule).
    """

    prompt_embeds: jax.Array
    pooled: jax.Array
    text_only_embeds: jax.Array
    text_only_pooled: jax.Array
    negative_embeds: jax.Array
    negative_pooled: jax.Array
    time_ids: jax.Array
    conditions: Mapping[str, jax.Array] = flax.struct.field(default_factory=dict)
    condition_scales: Mapping[str, jax.Array] = flax.struct.field(default_factory=dict)
    gated: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
    controls: tuple[ControlConditioning, ...] = ()
    t2i_features: tuple[jax.Array, ...] = ()
    t2i_steps: int | jax.Array = 0


def sdxl_time_ids(height: int, width: int, crop_top_left=(0, 0), original_size=None) -> jax.Array:
    """[1, 6] = original (h, w) + crop (top, left) + target (h, w), as diffusers' _get_add_time_ids."""
    oh, ow = original_size or (height, width)
    return jnp.array([[oh, ow, crop_top_left[0], crop_top_left[1], height, width]], jnp.float32)


def _tile(x: jax.Array, n: int) -> jax.Array:
    return jnp.broadcast_to(x, (n,) + x.shape[1:])


def _control_residuals(controlnets, controls, keep_i, x_in, t, context, text_embeds, time_ids):
    """Sum over the ControlNets of their (down, mid) residuals at one step; None without ControlNets."""
    total = None
    n = x_in.shape[0]
    for cn, ctl, keep in zip(controlnets, controls, keep_i):
        image = jnp.broadcast_to(ctl.image, (n,) + ctl.image.shape[1:])
        scale = jnp.asarray(ctl.scale, jnp.float32) * keep

        def run(scale, cn=cn, image=image):
            return cn(x_in, t, context, image, scale, text_embeds=text_embeds, time_ids=time_ids)

        shapes = jax.eval_shape(run, scale)
        # Outside [start, end] the residuals are exactly zero: skip the ControlNet's compute at that step.
        res = jax.lax.cond(keep > 0, run, lambda _: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes), scale)
        total = res if total is None else jax.tree.map(jnp.add, total, res)
    return total


def denoise(
    unet,
    scheduler,
    sched_state,
    latents: jax.Array,
    cond: Conditioning,
    *,
    guidance_scale: float | jax.Array,
    start_merge_step: int | jax.Array,
    on_step: Callable[[int], None] | None = None,
    controlnets: Sequence = (),
    controlnet_keep: jax.Array | None = None,
) -> jax.Array:
    """Runs the whole denoising loop; traceable (call it under jit). latents: [S, h, w, 4] initial noise
    already scaled by the scheduler's init_noise_sigma. Returns the final latents [S, h, w, 4].
    on_step(i): host callback after each step (a progress bar); costs one tiny host sync per step.
    controlnets: ControlNetModel modules, one per `cond.controls` entry; controlnet_keep: [K, num_steps] from
    `control_keep(cond.controls, num_steps)` (computed on the host: exact fractions)."""
    if len(controlnets) != len(cond.controls):
        raise ValueError(f"{len(controlnets)} ControlNet(s) but {len(cond.controls)} control input(s)")
    if controlnets and controlnet_keep is None:
        raise ValueError("controlnet_keep is required with ControlNets (sampling.control_keep)")
    s = latents.shape[0]
    neg = _tile(cond.negative_embeds, s)
    neg_pooled = _tile(cond.negative_pooled, s)
    time_ids = _tile(cond.time_ids, 2 * s)
    names = sorted(cond.conditions)
    cond_tokens = {n: jnp.concatenate([_tile(cond.conditions[n], s)] * 2) for n in names}
    zeros, ones = jnp.zeros((s,), jnp.float32), jnp.ones((s,), jnp.float32)

    def body(i, x):
        merged = i > start_merge_step  # PhotoMaker v1: `if i <= start_merge_step:` uses the text-only prompt
        emb = jnp.where(merged, cond.prompt_embeds, cond.text_only_embeds)
        pooled = jnp.where(merged, cond.pooled, cond.text_only_pooled)
        context = jnp.concatenate([neg, _tile(emb, s)])
        text_embeds = jnp.concatenate([neg_pooled, _tile(pooled, s)])
        x_in = scheduler.scale_model_input(sched_state, jnp.concatenate([x, x]), i)
        t = jnp.broadcast_to(sched_state.timesteps[i], (2 * s,))
        kwargs = {}
        if names:
            scales = {}
            for n in names:
                on = jnp.asarray(cond.condition_scales.get(n, 1.0), jnp.float32)
                if n in cond.gated:
                    on = jnp.where(merged, on, 0.0)
                scales[n] = jnp.concatenate([zeros, ones * on])  # unconditional half: condition absent
            kwargs = dict(conditions=cond_tokens, condition_scales=scales)
        if controlnets:
            # PhotoMaker's ControlNet pipeline: the ControlNets see the prompt without the ID tokens.
            cn_context = jnp.concatenate([neg, _tile(cond.text_only_embeds, s)])
            down, mid = _control_residuals(
                controlnets, cond.controls, controlnet_keep[:, i], x_in, t, cn_context, text_embeds, time_ids
            )
            kwargs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        if cond.t2i_features:
            on = (i < cond.t2i_steps).astype(jnp.float32)  # x + 0 * f is x exactly: "no adapter" after the steps
            kwargs["down_intrablock_additional_residuals"] = [
                jnp.broadcast_to(f, (2 * s,) + f.shape[1:]) * on.astype(f.dtype) for f in cond.t2i_features
            ]
        eps = unet(x_in, t, context, text_embeds=text_embeds, time_ids=time_ids, **kwargs)
        eps_u, eps_c = jnp.split(eps.astype(jnp.float32), 2)
        eps = eps_u + guidance_scale * (eps_c - eps_u)
        x = scheduler.step(sched_state, eps, i, x)
        if on_step is not None:
            jax.debug.callback(on_step, i, ordered=True)
        return x

    return jax.lax.fori_loop(0, sched_state.timesteps.shape[0], body, latents)


def decode_latents(vae, latents: jax.Array) -> jax.Array:
    """Latents -> images in [0, 1], [S, H, W, 3] (diffusers: x / scaling_factor + shift_factor)."""
    x = latents / vae.scaling_factor + vae.shift_factor
    image = vae.decode(x)
    return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def make_sampler(
    unet, vae, scheduler, num_steps: int, on_step: Callable[[int], None] | None = None, controlnets: Sequence = ()
):
    """A jitted `(noise [S,h,w,4], cond, guidance_scale, start_merge_step) -> images [S,H,W,3] in [0,1]`.

    noise ~ N(0, 1), unscaled: it is multiplied by the scheduler's init_noise_sigma inside.

    The models' graph structure is fixed here and their state is read at each call, so
    the compiled function is reused across calls with the same shapes (seeds, prompts,
    scales and the merge step are traced values: changing them does not recompile),
    and new weights put into the same modules (`nnx.update`, e.g. validation during
    training) are used without recompiling.
    """
    sched_state = scheduler.set_timesteps(num_steps)
    unet_def = nnx.graphdef(unet)
    vae_def = nnx.graphdef(vae)
    cn_defs = [nnx.graphdef(cn) for cn in controlnets]

    @jax.jit
    def run(unet_state, vae_state, cn_states, sched_state, noise, cond, guidance_scale, start_merge_step, keep):
        unet_m = nnx.merge(unet_def, unet_state)
        vae_m = nnx.merge(vae_def, vae_state)
        cns = [nnx.merge(d, st) for d, st in zip(cn_defs, cn_states)]
        latents = noise * scheduler.init_noise_sigma(sched_state)
        latents = denoise(
            unet_m,
            scheduler,
            sched_state,
            latents,
            cond,
            guidance_scale=guidance_scale,
            start_merge_step=start_merge_step,
            on_step=on_step,
            controlnets=cns,
            controlnet_keep=keep,
        )
        return decode_latents(vae_m, latents)

    def args(noise, cond, guidance_scale, start_merge_step):
        return (
            nnx.state(unet),
            nnx.state(vae),
            [nnx.state(cn) for cn in controlnets],
            sched_state,
            noise,
            cond,
            jnp.float32(guidance_scale),
            jnp.int32(start_merge_step),
            control_keep(cond.controls, num_steps) if controlnets else None,
        )

    def sample(noise, cond, guidance_scale, start_merge_step):
        return run(*args(noise, cond, guidance_scale, start_merge_step))

    # Lowering needs only the shapes and dtypes of the scalars, not their values.
    # A function attribute (scripts/bench/sample.py lowers the loop).
    sample.lower = lambda noise, cond: run.lower(*args(noise, cond, 0.0, 0))  # type: ignore[attr-defined]
    return sample
