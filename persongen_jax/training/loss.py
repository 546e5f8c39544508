"""The training objective: epsilon-prediction MSE, optionally masked to the face, with condition dropout.

Everything here is traced inside the one jitted train step; randomness comes from the step key
(`jax.random.fold_in(seed_key, step)`), so a run is reproducible and a resumed run draws the same
numbers as an uninterrupted one.
"""

from __future__ import annotations

import zlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from persongen_jax.conditions import Condition, image_condition, text_conditions, text_keys
from persongen_jax.models import iresnet
from persongen_jax.pipeline.prompt import encode_prompt


def downsample_mask(mask: jax.Array, factor: int) -> jax.Array:
    """[B, R, R, 1] in {0, 1} -> [B, R/f, R/f, 1] soft mask (mean over each f x f cell)."""
    b, h, w, c = mask.shape
    if factor == 1:
        return mask.astype(jnp.float32)
    return mask.astype(jnp.float32).reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array, use_mask: jax.Array) -> jax.Array:
    """Mean over the batch of the per-sample loss:

        use_mask[b] and sum(mask[b]) > 0:  sum(err * mask) / (sum(mask) * C)   (mean over mask pixels)
        otherwise:                         mean(err)

    pred, target [B, h, w, C]; mask [B, h, w, 1] (weights in [0, 1]); use_mask [B] bool.
    """
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    c = err.shape[-1]
    full = jnp.mean(err, axis=(1, 2, 3))
    m = mask.astype(jnp.float32)
    msum = jnp.sum(m, axis=(1, 2, 3))
    masked = jnp.sum(err * m, axis=(1, 2, 3)) / jnp.maximum(msum * c, 1e-8)
    per = jnp.where(use_mask & (msum > 0), masked, full)
    return jnp.mean(per)


def _bernoulli(key, p: float, shape) -> jax.Array:
    if p <= 0:
        return jnp.zeros(shape, bool)
    return jax.random.bernoulli(key, p, shape)


def arcface_embeds(model, batch: Mapping[str, jax.Array]) -> jax.Array:
    """PhotoMaker V2's id_embeds [B, K, F] (raw ArcFace embeddings, no gradient): the records' stored ones
    (`has_id_embeds`), the others computed by the model's frozen ArcFace from `arcface_pixel_values`
    [B, K, A, A, 3] (`data.pipeline.IdInputs`)."""
    stored = batch["id_embeds"].astype(jnp.float32)
    if getattr(model, "arcface", None) is None:
        return stored  # the data pipeline refused records without an embedding (IdEmbedsError)
    crops = batch["arcface_pixel_values"]
    b, k = crops.shape[:2]
    computed = iresnet.embed(model.arcface, crops.reshape(b * k, *crops.shape[2:]), normalize=False).reshape(b, k, -1)
    return jax.lax.stop_gradient(jnp.where(batch["has_id_embeds"][..., None], stored, computed))


def compute_loss(
    model,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    *,
    scheduler,
    loss_cfg: Mapping[str, Any],
    conditions: Mapping[str, Condition],
    id_injection: str,
    adapters: Mapping[str, Any] | None,
    empty_ids: tuple[jax.Array, jax.Array],
    compute_dtype=None,
) -> tuple[jax.Array, dict]:
    """One batch -> (loss, aux metrics). model: `PersonGenModel` (unet, vae, text encoders, id_encoder).

    batch (global, sharded on 'data'): pixel_values [B,R,R,3] in [-1,1]; face_mask [B,R,R,1];
    id_pixel_values [B,K,S,S,3]; num_id_images [B]; ids_1/ids_2/text_only_ids_1/2 [B,77];
    class_tokens_mask [B,77]; PhotoMaker V2 also id_embeds [B,K,F], has_id_embeds [B,K] and (with the model's
    ArcFace) arcface_pixel_values [B,K,A,A,3] (`arcface_embeds`); per text condition c: c_ids_1/2 [B,77] + has_c [B] (`conditions.text_keys`);
    original_size, crop_top_left [B,2].
    conditions: the declared conditions (`conditions.from_config`); those with adapter layers
    (`adapters["names"]`) are fed to the UNet, each dropped per example with its probability `drop`;
    the image condition's drop also removes the fused ID tokens from the prompt (`id_injection` text/both).
    """
    b = batch["pixel_values"].shape[0]
    k_lat, k_noise, k_t, k_mask, k_text, k_cond = jax.random.split(key, 6)
    adapter_names = list((adapters or {}).get("names", []))
    # Each condition draws from its own key, folded from its name: adding a condition leaves the others' draws.
    drops = {
        n: _bernoulli(jax.random.fold_in(k_cond, zlib.crc32(n.encode())), c.drop, (b,)) for n, c in conditions.items()
    }

    # Latents on the fly (frozen VAE): diffusers' SDXL training uses latent_dist.sample() * scaling_factor.
    vae = model.vae
    dist = vae.encode(batch["pixel_values"].astype(compute_dtype or jnp.float32))
    latents = jax.lax.stop_gradient((dist.sample(k_lat) - vae.shift_factor) * vae.scaling_factor)
    latents = latents.astype(jnp.float32)
    noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
    t = jax.random.randint(k_t, (b,), 0, scheduler.num_train_timesteps)
    noisy = scheduler.add_noise(latents, noise, t)

    # All prompts through the frozen text encoders in one call: [ids; text_only; text conditions...; empty].
    texts = text_conditions(conditions, adapter_names)
    keys = [text_keys(c.name) for c in texts]
    rows_1 = [batch["ids_1"], batch["text_only_ids_1"]] + [batch[k1] for k1, _, _ in keys] + [empty_ids[0]]
    rows_2 = [batch["ids_2"], batch["text_only_ids_2"]] + [batch[k2] for _, k2, _ in keys] + [empty_ids[1]]
    emb, pooled = encode_prompt(
        model.text_encoder, model.text_encoder_2, jnp.concatenate(rows_1), jnp.concatenate(rows_2)
    )
    emb, pooled = jax.lax.stop_gradient(emb), jax.lax.stop_gradient(pooled)
    chunk = lambda x, i: x[i * b : (i + 1) * b]
    emb_ids, pooled_ids = chunk(emb, 0), chunk(pooled, 0)
    emb_txt, pooled_txt = chunk(emb, 1), chunk(pooled, 1)
    empty_emb, empty_pooled = emb[-1:], pooled[-1:]

    drop_text = _bernoulli(k_text, loss_cfg["drop_text"], (b,))
    identity = image_condition(conditions)
    drop_id = drops[identity.name] if identity is not None else jnp.zeros((b,), bool)
    col = lambda m: m[:, None, None]
    unet_conditions, scales = {}, {}
    default_scales = (adapters or {}).get("scales", {})

    id_pixels = batch["id_pixel_values"].astype(compute_dtype or jnp.float32)
    if getattr(model.id_encoder, "version", "v1") == "v2":  # PhotoMaker V2: num_tokens tokens per image
        id_embeds = model.id_encoder.id_tokens(id_pixels, arcface_embeds(model, batch))
    else:
        id_embeds = model.id_encoder.id_embeds(id_pixels)
    if id_injection in ("text", "both"):
        fused = model.id_encoder.fuse(emb_ids, id_embeds, batch["class_tokens_mask"])
        # identity dropped -> the prompt without the trigger word (no ID fusion)
        text_emb = jnp.where(col(drop_id), emb_txt, fused)
        text_pooled = jnp.where(drop_id[:, None], pooled_txt, pooled_ids)
    else:
        text_emb, text_pooled = emb_txt, pooled_txt
    if id_injection in ("cross_attn", "both"):
        # IP-Adapter with several reference images: mean of the valid image embeddings.
        k = id_embeds.shape[1]
        valid = (jnp.arange(k)[None] < batch["num_id_images"][:, None]).astype(id_embeds.dtype)
        mean_id = jnp.sum(id_embeds * valid[..., None], 1) / jnp.maximum(valid.sum(1, keepdims=True), 1)
        name = model.unet.image_proj.condition
        unet_conditions[name] = model.unet.image_proj(mean_id)
        scales[name] = default_scales.get(name, 1.0) * (1.0 - drop_id.astype(jnp.float32))

    text_emb = jnp.where(col(drop_text), empty_emb.astype(text_emb.dtype), text_emb)
    text_pooled = jnp.where(drop_text[:, None], empty_pooled.astype(text_pooled.dtype), text_pooled)

    for i, (c, (_, _, has)) in enumerate(zip(texts, keys)):
        unet_conditions[c.name] = chunk(emb, 2 + i)
        keep = batch[has].astype(bool) & ~drops[c.name]
        scales[c.name] = default_scales.get(c.name, 1.0) * keep.astype(jnp.float32)

    r = batch["pixel_values"].shape[1]
    target_size = jnp.full((b, 2), r, jnp.float32)
    time_ids = jnp.concatenate(
        [batch["original_size"].astype(jnp.float32), batch["crop_top_left"].astype(jnp.float32), target_size], axis=1
    )
    pred = model.unet(
        noisy.astype(compute_dtype or jnp.float32),
        t,
        text_emb,
        text_embeds=text_pooled,
        time_ids=time_ids,
        conditions=unet_conditions or None,
        condition_scales=scales or None,
    )
    use_mask = _bernoulli(k_mask, loss_cfg["mask_loss_prob"], (b,))
    mask = downsample_mask(batch["face_mask"], r // latents.shape[1])
    loss = masked_mse(pred, noise, mask, use_mask)
    return loss, {"mask_frac": jnp.mean(use_mask.astype(jnp.float32))}
