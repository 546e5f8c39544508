"""The full training step (ID encoder + frozen text encoders + VAE encode + UNet with LoRA and an `id`
adapter + masked loss + Adam on the trainable groups), JAX (our train loop) vs PyTorch eager
(diffusers UNet + peft LoRA + diffusers IP-Adapter + PhotoMaker's ID encoder/fuse module), same
CPU/GPU, one child process per framework.

    python scripts/bench/train_step.py                      # tiny SDXL-shaped parts, 64x64 images, batch 4
    python scripts/bench/train_step.py --batch 8 --res 128 --steps 20

Both sides: tiny_sdxl shapes (the demo model), LoRA r4 on to_q/k/v/out.0, parallel `id` adapter with a
4-token image projection, identity also fused into the text (PhotoMaker), K=2 reference crops, fp32.
The JAX number is the real train loop's step timed from outside (`common.StepClock`: the clock read after
`jax.block_until_ready` on each step's outputs; synthetic host batch -> device included, ~3 ms); the
PyTorch number is the step on a fixed batch (synchronised likewise on a GPU). Both encode the prompt, the text-only prompt and the
empty prompt (condition dropout) with the frozen text encoders. Prints img/s, the ratio, JAX compile time, XLA FLOPs per step and MFU on known GPUs.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.bench import common  # noqa: E402

LORA_RANK, TOKENS = 4, 4


def jax_config(args):
    from configs import default

    c = default.get_config()
    c.model = "tiny"
    c.dtype = args.dtype
    c.lora.rank, c.lora.alpha = LORA_RANK, float(LORA_RANK)
    c.adapters.names = ("id",)
    c.adapters.num_tokens = TOKENS
    c.id_injection = "both"
    c.trainable = default.groups(heads=1e-5, fuse_mlp=1e-5, lora=1e-4, adapters=1e-5, image_proj=1e-5)
    c.data.source = "synthetic"
    c.data.global_batch_size, c.data.resolution, c.data.num_refs = args.batch, args.res, args.refs
    c.total_steps = args.warmup + args.steps
    # Logged once, at the end (a real run logs every 50-100 steps); the benchmark reads its own clock.
    c.log_every, c.checkpoint_every, c.progress_bar = c.total_steps, 10**9, False
    return c


def run_jax(args) -> dict:
    import jax

    if args.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")
    from persongen_jax.training import train_and_evaluate

    clock = common.StepClock()
    with tempfile.TemporaryDirectory() as wd:
        out = train_and_evaluate(jax_config(args), wd, devices=jax.devices()[:1], on_step=clock)
    times = clock.step_times(args.warmup)
    med = statistics.median(times)
    dev = jax.devices()[0]
    res = {
        "framework": "jax",
        "device": dev.device_kind,
        "median_s": med,
        "times": times,
        "compile_s": out["compiled"]["compile_s"],
        "flops_per_step": out["compiled"].get("flops_per_step"),
        "memory_mib": out["compiled"].get("memory_mib"),
        "trainable": sum(v.size for v in out["params"].values()),
    }
    return {**res, **common.jax_device_stats(med, res["flops_per_step"], args.dtype)}


def run_torch(args) -> dict:
    import numpy as np
    import torch
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    from persongen_jax.models.id_encoder import PhotoMakerIDEncoder
    from persongen_jax.testing import tiny_sdxl

    dev = common.torch_device()
    torch.manual_seed(0)
    nn = torch.nn

    class MLP(nn.Module):  # PhotoMaker v1 photomaker/model.py
        def __init__(self, din, dout, hidden, residual):
            super().__init__()
            self.layernorm, self.fc1, self.fc2 = nn.LayerNorm(din), nn.Linear(din, hidden), nn.Linear(hidden, dout)
            self.residual = residual

        def forward(self, x):
            y = self.fc2(nn.functional.gelu(self.fc1(self.layernorm(x))))
            return y + x if self.residual else y

    class Fuse(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.mlp1, self.mlp2, self.layer_norm = MLP(2 * d, d, d, False), MLP(d, d, d, True), nn.LayerNorm(d)

        def forward(self, prompt_embeds, id_embeds, class_tokens_mask, valid):
            # PhotoMaker's fuse, batched: class-token vectors of all rows replaced in one scatter
            c = prompt_embeds[class_tokens_mask]
            x = self.mlp1(torch.cat([c, id_embeds[valid]], -1)) + c
            out = prompt_embeds.clone()
            out[class_tokens_mask] = self.layer_norm(self.mlp2(x))
            return out

    pm = PhotoMakerIDEncoder.preset_config("tiny")
    vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**pm["vision_config"])).to(dev)
    proj2 = nn.Linear(pm["vision_config"]["hidden_size"], pm["projection_dim_2"], bias=False).to(dev)
    d = pm["vision_config"]["projection_dim"] + pm["projection_dim_2"]
    fuse = Fuse(d).to(dev)
    te1 = transformers.CLIPTextModel(transformers.CLIPTextConfig(**tiny_sdxl.TEXT_ENCODER)).to(dev).eval()
    te2 = (
        transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**tiny_sdxl.TEXT_ENCODER_2)).to(dev).eval()
    )
    vae = AutoencoderKL(**tiny_sdxl.VAE).to(dev).eval()
    unet = UNet2DConditionModel(**tiny_sdxl.UNET)
    # IP-Adapter `id` adapter (image projection of the mean ID embedding, to_k_ip / to_v_ip per attn2)
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g) / s[-1] ** 0.5
    cross = tiny_sdxl.UNET["cross_attention_dim"]
    ip = {}
    for i, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            inner = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
            ip[f"{i}.to_k_ip.weight"], ip[f"{i}.to_v_ip.weight"] = r(inner, cross), r(inner, cross)
    unet._load_ip_adapter_weights(
        [
            {
                "image_proj": {
                    "proj.weight": r(TOKENS * cross, d),
                    "proj.bias": r(TOKENS * cross),
                    "norm.weight": torch.ones(cross),
                    "norm.bias": torch.zeros(cross),
                },
                "ip_adapter": ip,
            }
        ]
    )
    unet.add_adapter(
        LoraConfig(
            r=LORA_RANK,
            lora_alpha=LORA_RANK,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    unet = unet.to(dev).train()
    for m in (vision, te1, te2, vae, unet):
        m.requires_grad_(False)
    lora_params = [p for n, p in unet.named_parameters() if "lora_" in n]
    adapter_params = [p for n, p in unet.named_parameters() if "_ip" in n or "encoder_hid_proj" in n]
    heads = list(vision.visual_projection.parameters()) + list(proj2.parameters())
    for p in lora_params + adapter_params + heads:
        p.requires_grad_(True)
    opt = torch.optim.Adam(
        [
            {"params": lora_params, "lr": 1e-4},
            {"params": adapter_params, "lr": 1e-5},
            {"params": heads + list(fuse.parameters()), "lr": 1e-5},
        ]
    )
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

    B, R, K, S = args.batch, args.res, args.refs, pm["vision_config"]["image_size"]
    rng = np.random.default_rng(0)
    T = lambda a: torch.from_numpy(np.asarray(a)).to(dev)
    pix = T(rng.uniform(-1, 1, (B, 3, R, R)).astype(np.float32))
    mask = torch.zeros(B, 1, R, R, device=dev)
    mask[:, :, R // 4 : 3 * R // 4, R // 4 : 3 * R // 4] = 1
    refs = T(rng.standard_normal((B * K, 3, S, S)).astype(np.float32))
    ids = T(rng.integers(0, 500, (B, 77)))
    ctm = torch.zeros(B, 77, dtype=torch.bool, device=dev)
    ctm[:, 5 : 5 + K] = True
    valid = torch.ones(B, K, dtype=torch.bool, device=dev)
    time_ids = T(np.tile(np.array([[R, R, 0, 0, R, R]], np.float32), (B, 1)))
    use_mask = T(rng.random(B) < 0.5)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            latents = vae.encode(pix).latent_dist.sample() * vae.config.scaling_factor
            # as the JAX step: prompt, text-only prompt (identity dropout) and the empty prompt (text dropout)
            rows = torch.cat([ids, ids, ids[:1]])
            h1 = te1(rows, output_hidden_states=True).hidden_states[-2]
            o2 = te2(rows, output_hidden_states=True)
            emb, pooled = torch.cat([h1, o2.hidden_states[-2]], -1)[:B], o2.text_embeds[:B]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (B,), device=dev)
        noisy = sched.add_noise(latents, noise, t)
        pooled_v = vision.vision_model(refs).pooler_output
        id_emb = torch.cat([vision.visual_projection(pooled_v), proj2(pooled_v)], -1).view(B, K, -1)
        fused = fuse(emb, id_emb, ctm, valid)
        pred = unet(
            noisy,
            t,
            fused,
            added_cond_kwargs={
                "text_embeds": pooled,
                "time_ids": time_ids,
                "image_embeds": [id_emb.mean(1, keepdim=True)],
            },
        ).sample
        err = (pred - noise) ** 2
        m = nn.functional.avg_pool2d(mask, R // latents.shape[-1])
        masked = (err * m).sum((1, 2, 3)) / (m.sum((1, 2, 3)) * err.shape[1])
        loss = torch.where(use_mask, masked, err.mean((1, 2, 3))).mean()
        loss.backward()
        opt.step()
        return loss

    n_train = sum(p.numel() for p in lora_params + adapter_params + heads + list(fuse.parameters()))
    return common.torch_result(step, args.steps, args.warmup, dev, trainable=n_train)


def report(args, pt: dict, jx: dict) -> None:
    ips = lambda r: args.batch / r["median_s"]
    print(
        f"full train step (ID encoder + text encoders + VAE encode + UNet/LoRA r{LORA_RANK}/id adapter + Adam), "
        f"batch {args.batch}, {args.res}x{args.res}, {args.refs} refs, {args.dtype}, {args.steps} timed steps"
    )
    side = lambda name, r: (
        f"  {name:14s}: {ips(r):7.2f} img/s  (median {r['median_s'] * 1e3:7.1f} ms, "
        f"{r['trainable'] / 1e3:.0f}k trainable, peak {r['peak_mib']:.0f} MiB"
    )
    print(side("pytorch eager", pt) + ")")
    print(side("jax (jit)", jx) + f", compile {jx['compile_s']:.1f} s)")
    print(f"  ratio jax/pytorch img/s = {ips(jx) / ips(pt):.2f}x  (>1: JAX faster)")
    if jx.get("flops_per_step"):
        print(common.flops_line(f"  XLA flops/step {jx['flops_per_step'] / 1e9:.2f} GFLOP", jx))


def main():
    p = common.framework_parser(__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--res", type=int, default=64, help="image resolution (latents are res / 2 for the tiny VAE)")
    p.add_argument("--refs", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    common.jax_vs_pytorch(__file__, p.parse_args(), run_jax, run_torch, report)


if __name__ == "__main__":
    main()
