"""IP-Adapter: a tiny diffusers UNet with `IPAdapterAttnProcessor2_0` + `ImageProjection` (loaded by
`unet._load_ip_adapter_weights` from a checkpoint in the IP-Adapter `{image_proj, ip_adapter}` layout,
random weights) vs our `parallel` `id` adapter converted by `weights_conversion ip-adapter`;
the key numbering vs diffusers' `attn_processors` order; export-adapter back to the same tensors.

Tolerance: rtol = atol = 1e-4 on the noise prediction (fp32).
"""

from __future__ import annotations

import helpers
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persongen_jax.models import from_pretrained, lora
from weights_conversion.__main__ import main as convert_main
from weights_conversion.lora import ip_adapter_numbering

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

B, IMG_DIM, TOKENS, SCALE = 2, 24, 4, 0.7


@nnx.jit
def _call(model, sample, t, ehs, te, ti, image):
    return model(sample, t, ehs, te, ti, conditions={"id": model.image_proj(image)})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    unet = helpers.parity_unet(seed=0)
    root = tmp_path_factory.mktemp("ip")
    unet.save_pretrained(root / "src" / "unet")
    cross = [n.removesuffix(".processor") for n in unet.attn_processors if n.endswith("attn2.processor")]
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g) / s[-1] ** 0.5
    ip = {}
    for i, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            inner = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
            ip[f"{i}.to_k_ip.weight"], ip[f"{i}.to_v_ip.weight"] = r(inner, 32), r(inner, 32)
    ckpt = {
        "image_proj": {
            "proj.weight": r(TOKENS * 32, IMG_DIM),
            "proj.bias": 0.1 * r(TOKENS * 32),
            "norm.weight": 1 + 0.1 * r(32),
            "norm.bias": 0.1 * r(32),
        },
        "ip_adapter": ip,
    }
    torch.save(ckpt, root / "ip.bin")
    unet._load_ip_adapter_weights([ckpt])
    # The CLI in-process (the subprocess path is covered by test_lora / test_conversion_cli).
    assert convert_main(["sdxl", str(root / "src"), str(root / "dst")]) == 0
    assert (
        convert_main(
            [
                "ip-adapter",
                str(root / "ip.bin"),
                str(root / "adapter"),
                "--unet",
                str(root / "dst" / "unet"),
                "--scale",
                str(SCALE),
            ]
        )
        == 0
    )
    return root, unet, cross, ckpt


def test_numbering_matches_diffusers(setup):
    _, unet, cross, _ = setup
    assert ip_adapter_numbering(cross) == {n: 1 + 2 * i for i, n in enumerate(cross)}
    ours = ip_adapter_numbering(lora.cross_attentions(from_pretrained(setup[0] / "dst" / "unet")))
    expected = {
        n.removesuffix(".processor"): i for i, n in enumerate(unet.attn_processors) if n.endswith("attn2.processor")
    }
    assert ours == expected


def test_ip_adapter_parity(setup):
    root, unet, _, _ = setup
    rng = np.random.default_rng(2)
    x = helpers.parity_unet_inputs(rng, 16, [7, 500], [[64, 64, 0, 0, 64, 64]] * B)
    x["image"] = rng.standard_normal((B, 1, IMG_DIM)).astype(np.float32)
    T = torch.from_numpy

    def reference(scale):
        for p in unet.attn_processors.values():
            if isinstance(p, diffusers.models.attention_processor.IPAdapterAttnProcessor2_0):
                p.scale = [scale]
        with torch.no_grad():
            return unet(
                T(x["sample"]),
                T(x["timesteps"]),
                T(x["ehs"]),
                added_cond_kwargs={
                    "text_embeds": T(x["text_embeds"]),
                    "time_ids": T(x["time_ids"]),
                    "image_embeds": [T(x["image"])],
                },
            ).sample.numpy()

    ref, plain = reference(SCALE), reference(0.0)
    assert np.abs(ref - plain).max() > 1e-2  # the adapter matters
    model = from_pretrained(root / "dst" / "unet")
    lora.load_adapters(model, root / "adapter")
    cfg = lora.adapter_config(model)
    assert cfg["mode"] == "parallel" and cfg["scales"] == {"id": SCALE}
    assert cfg["image_projection"]["num_tokens"] == TOKENS
    args = [jnp.asarray(x["sample"].transpose(0, 2, 3, 1))] + [
        jnp.asarray(x[k]) for k in ("timesteps", "ehs", "text_embeds", "time_ids", "image")
    ]
    out = np.asarray(_call(model, *args)).transpose(0, 3, 1, 2)
    helpers.assert_close(out, ref, name="noise prediction with IP-Adapter")


def test_export_adapter(setup, tmp_path):
    root, _, _, ckpt = setup
    helpers.run_cli("export-adapter", root / "adapter", tmp_path / "ip.safetensors")
    from safetensors.numpy import load_file

    got = load_file(tmp_path / "ip.safetensors")
    want = {f"{sec}.{k}": v.numpy() for sec in ("image_proj", "ip_adapter") for k, v in ckpt[sec].items()}
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
