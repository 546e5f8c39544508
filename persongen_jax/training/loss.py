"""The training objective: epsilon-prediction MSE, optionally masked to the face, with condition dropout.

Everything here is traced inside the one jitted train step; randomness comes from the step key
(`jax.random.fold_in(seed_key, step)`), so a run is reproducible and a resumed run draws the same
numbers as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

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


def compute_loss(model, batch: Mapping[str, jax.Array], key: jax.Array, *, scheduler, loss_cfg: Mapping[str, Any],
                 id_injection: str, adapters: Mapping[str, Any] | None, empty_ids: tuple[jax.Array, jax.Array],
                 compute_dtype=None) -> tuple[jax.Array, dict]:
    """One batch -> (loss, aux metrics). model: `PersonGenModel` (unet, vae, text encoders, id_encoder).

    batch (global, sharded on 'data'): pixel_values [B,R,R,3] in [-1,1]; face_mask [B,R,R,1];
    id_pixel_values [B,K,S,S,3]; num_id_images [B]; ids_1/ids_2/text_only_ids_1/2 [B,77];
    class_tokens_mask [B,77]; bg_ids_1/2, body_ids_1/2 [B,77] + has_bg/has_body [B];
    original_size, crop_top_left [B,2].
    """
    b = batch["pixel_values"].shape[0]
    k_lat, k_noise, k_t, k_mask, k_text, k_id, k_bg, k_body = jax.random.split(key, 8)

    # Latents on the fly (frozen VAE): diffusers' SDXL training uses latent_dist.sample() * scaling_factor.
    vae = model.vae
    dist = vae.encode(batch["pixel_values"].astype(compute_dtype or jnp.float32))
    latents = jax.lax.stop_gradient((dist.sample(k_lat) - vae.shift_factor) * vae.scaling_factor)
    latents = latents.astype(jnp.float32)
    noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
    t = jax.random.randint(k_t, (b,), 0, scheduler.num_train_timesteps)
    noisy = scheduler.add_noise(latents, noise, t)

    # All prompts through the frozen text encoders in one call: [ids; text_only; bg; body; empty].
    names = [n for n in (adapters or {}).get("names", []) if n in ("bg", "body")]
    rows_1 = [batch["ids_1"], batch["text_only_ids_1"]] + [batch[f"{n}_ids_1"] for n in names] + [empty_ids[0]]
    rows_2 = [batch["ids_2"], batch["text_only_ids_2"]] + [batch[f"{n}_ids_2"] for n in names] + [empty_ids[1]]
    emb, pooled = encode_prompt(model.text_encoder, model.text_encoder_2, jnp.concatenate(rows_1),
                                jnp.concatenate(rows_2))
    emb, pooled = jax.lax.stop_gradient(emb), jax.lax.stop_gradient(pooled)
    chunk = lambda x, i: x[i * b:(i + 1) * b]
    emb_ids, pooled_ids = chunk(emb, 0), chunk(pooled, 0)
    emb_txt, pooled_txt = chunk(emb, 1), chunk(pooled, 1)
    empty_emb, empty_pooled = emb[-1:], pooled[-1:]

    drop_text = _bernoulli(k_text, loss_cfg["drop_text"], (b,))
    drop_id = _bernoulli(k_id, loss_cfg["drop_id"], (b,))
    col = lambda m: m[:, None, None]
    conditions, scales = {}, {}
    default_scales = (adapters or {}).get("scales", {})

    id_embeds = model.id_encoder.id_embeds(batch["id_pixel_values"].astype(compute_dtype or jnp.float32))
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
        conditions["id"] = model.unet.image_proj(mean_id)
        scales["id"] = default_scales.get("id", 1.0) * (1.0 - drop_id.astype(jnp.float32))

    text_emb = jnp.where(col(drop_text), empty_emb.astype(text_emb.dtype), text_emb)
    text_pooled = jnp.where(drop_text[:, None], empty_pooled.astype(text_pooled.dtype), text_pooled)

    for i, n in enumerate(names):
        drop = _bernoulli(k_bg if n == "bg" else k_body, loss_cfg[f"drop_{n}"], (b,))
        conditions[n] = chunk(emb, 2 + i)
        keep = batch[f"has_{n}"].astype(bool) & ~drop
        scales[n] = default_scales.get(n, 1.0) * keep.astype(jnp.float32)

    r = batch["pixel_values"].shape[1]
    target_size = jnp.full((b, 2), r, jnp.float32)
    time_ids = jnp.concatenate([batch["original_size"].astype(jnp.float32),
                                batch["crop_top_left"].astype(jnp.float32), target_size], axis=1)
    pred = model.unet(noisy.astype(compute_dtype or jnp.float32), t, text_emb, text_embeds=text_pooled,
                      time_ids=time_ids, conditions=conditions or None, condition_scales=scales or None)
    use_mask = _bernoulli(k_mask, loss_cfg["mask_loss_prob"], (b,))
    mask = downsample_mask(batch["face_mask"], r // latents.shape[1])
    loss = masked_mse(pred, noise, mask, use_mask)
    return loss, {"mask_frac": jnp.mean(use_mask.astype(jnp.float32))}
