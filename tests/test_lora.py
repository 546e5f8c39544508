"""UNet LoRA: parity with diffusers' `load_lora_weights` (PEFT backend) for the key styles the
`lora` conversion accepts, merge_lora, the export-lora round trip, and conversion errors.

Tiny SDXL UNet, fp32, random base weights and random non-zero LoRA weights.
Tolerances: noise prediction rtol = atol = 1e-4 against diffusers; merged vs unmerged 1e-5.
"""

from __future__ import annotations

import helpers
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persongen_jax.models import from_pretrained, lora
from persongen_jax.models.unet import UNet2DConditionModel
from weights_conversion.__main__ import main as convert_main

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from safetensors.torch import save_file  # noqa: E402

B, RANK = 2, 4


@nnx.jit
def _call(model, *args):
    return model(*args)


class _LoraLoader(diffusers.loaders.StableDiffusionXLLoraLoaderMixin):
    """The SDXL pipeline's `load_lora_weights` on a bare UNet (no text encoders)."""

    hf_device_map = None

    def __init__(self, unet):
        self.unet, self.text_encoder, self.text_encoder_2 = unet, None, None

    @property
    def components(self):
        return {"unet": self.unet}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, diffusers UNet state dict, converted UNet folder, inputs)."""
    model = helpers.parity_unet(seed=0)
    root = tmp_path_factory.mktemp("lora")
    model.save_pretrained(root / "src" / "unet")
    _cli("sdxl", root / "src", root / "dst")
    time_ids = [[64, 64, 0, 0, 64, 64], [48, 80, 4, 8, 64, 96]]
    inputs = helpers.parity_unet_inputs(np.random.default_rng(1), 8, [3, 700], time_ids)
    return root, model, root / "dst" / "unet", inputs


def _torch_unet(tiny):
    root, _, _, _ = tiny
    return diffusers.UNet2DConditionModel.from_pretrained(root / "src" / "unet").eval()


def _torch_out(unet, x):
    T = torch.from_numpy
    with torch.no_grad():
        return unet(
            T(x["sample"]),
            T(x["timesteps"]),
            T(x["ehs"]),
            added_cond_kwargs={"text_embeds": T(x["text_embeds"]), "time_ids": T(x["time_ids"])},
        ).sample.numpy()


def _flax_out(model, x):
    args = [
        jnp.asarray(x["sample"].transpose(0, 2, 3, 1)),
        jnp.asarray(x["timesteps"]),
        jnp.asarray(x["ehs"]),
        jnp.asarray(x["text_embeds"]),
        jnp.asarray(x["time_ids"]),
    ]
    return np.asarray(_call(model, *args)).transpose(0, 3, 1, 2)


def _modules(torch_unet, patterns=lora.DEFAULT_TARGETS):
    return {n: m for n, m in torch_unet.named_modules() if isinstance(m, torch.nn.Linear) and lora.matches(n, patterns)}


def _random_lora(modules, seed):
    """{module: (down [r, in], up [out, r])}, non-zero, sized so the LoRA visibly changes the output."""
    g = torch.Generator().manual_seed(seed)
    return {
        n: (
            torch.randn(RANK, m.in_features, generator=g) / m.in_features**0.5,
            torch.randn(m.out_features, RANK, generator=g) * 0.3 / RANK**0.5,
        )
        for n, m in modules.items()
    }


def _cli(*args):
    """The conversion CLI in-process (cheaper than a subprocess; `helpers.run_cli` covers that path)."""
    assert convert_main([str(a) for a in args]) == 0


def _check(tiny, lora_file):
    root, _, unet_dir, x = tiny
    ref_unet = _torch_unet(tiny)
    _LoraLoader(ref_unet).load_lora_weights(str(lora_file))
    ref = _torch_out(ref_unet, x)
    dst = lora_file.with_suffix(".flax")
    _cli("lora", lora_file, dst, "--unet", unet_dir)
    model = from_pretrained(unet_dir)
    base = _flax_out(model, x)
    lora.load_lora(model, dst)
    out = _flax_out(model, x)
    assert np.abs(out - base).max() > 1e-2, "the LoRA must change the output for the test to mean anything"
    helpers.assert_close(out, ref, name="noise prediction with LoRA")
    return model, out


def test_peft_style_parity(tiny):
    root = tiny[0]
    weights = _random_lora(_modules(_torch_unet(tiny)), seed=1)
    sd = {}
    for n, (down, up) in weights.items():
        sd[f"unet.{n}.lora_A.weight"], sd[f"unet.{n}.lora_B.weight"] = down, up
    save_file(sd, root / "peft.safetensors")
    model, out = _check(tiny, root / "peft.safetensors")

    # merge_lora folds the LoRA into the base kernels with the same outputs.
    assert lora.merge_lora(model) == len(weights)
    assert not nnx.state(model, lora.LoRAParam)
    np.testing.assert_allclose(_flax_out(model, tiny[3]), out, rtol=1e-5, atol=1e-5)


def test_kohya_style_parity(tiny):
    """kohya names + alphas (scale alpha / rank), also on feed-forward linears.

    diffusers drops per-module alphas of kohya attention keys (its alpha_pattern keeps the
    `processor.to_q_lora.down.weight` spelling and matches nothing), so the attention modules share
    one alpha here and only the ff modules differ; ours applies every module's own alpha."""
    root = tiny[0]
    weights = _random_lora(_modules(_torch_unet(tiny), lora.DEFAULT_TARGETS + ("ff.net.2",)), seed=2)
    sd = {}
    for n, (down, up) in weights.items():
        name = "lora_unet_" + n.replace(".", "_")
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        sd[f"{name}.alpha"] = torch.tensor(8.0 if n.endswith("ff.net.2") else 2.0)
    save_file(sd, root / "kohya.safetensors")
    model, _ = _check(tiny, root / "kohya.safetensors")
    scales = {m.lora_scale for m in lora.linear_modules(model).values() if m.lora_A is not None}
    assert scales == {0.5, 2.0}


def _old_diffusers_keys(weights: dict) -> dict:
    """{module name: (down, up)} -> the old diffusers key style (`unet.<attn>.processor.to_q_lora.down.weight`)."""
    sd = {}
    for n, (down, up) in weights.items():
        parent, proj = n.rsplit(".to_", 1)
        proj = "to_" + proj.replace("out.0", "out")
        sd[f"unet.{parent}.processor.{proj}_lora.down.weight"] = down
        sd[f"unet.{parent}.processor.{proj}_lora.up.weight"] = up
    return sd


def test_old_diffusers_style_parity(tiny):
    """`unet.<attn>.processor.to_q_lora.down.weight` (PhotoMaker v1's lora_weights layout)."""
    root = tiny[0]
    sd = _old_diffusers_keys(_random_lora(_modules(_torch_unet(tiny)), seed=3))
    torch.save(sd, root / "old.bin")
    _check(tiny, root / "old.bin")


def test_export_round_trip(tiny, tmp_path):
    """Flax LoRA (mixed ranks/alphas) -> save_lora -> export-lora -> diffusers load_lora_weights."""
    _, _, unet_dir, x = tiny
    model = from_pretrained(unet_dir)
    paths = lora.add_lora(model, RANK, 8.0, rngs=nnx.Rngs(0))
    lora.add_lora(model, 2, 1.0, ["ff.net.2"], rngs=nnx.Rngs(1))
    rng = np.random.default_rng(5)
    for _, var in nnx.to_flat_state(nnx.state(model, lora.LoRAParam)):
        var.set_value(jnp.asarray(rng.standard_normal(var.get_value().shape).astype(np.float32) * 0.1))
    out = _flax_out(model, x)
    lora.save_lora(model, tmp_path / "trained")
    _cli("export-lora", tmp_path / "trained", tmp_path / "exported.safetensors")

    ref_unet = _torch_unet(tiny)
    _LoraLoader(ref_unet).load_lora_weights(str(tmp_path / "exported.safetensors"))
    helpers.assert_close(out, _torch_out(ref_unet, x), name="exported LoRA in diffusers")

    # ... and back: the exported file converts to the same LoRA (its metadata carries rank/alpha).
    _cli("lora", tmp_path / "exported.safetensors", tmp_path / "back", "--unet", unet_dir)
    again = from_pretrained(unet_dir)
    lora.load_lora(again, tmp_path / "back")
    assert len(paths) < len(lora.lora_modules(again))
    assert lora.lora_modules(again) == lora.lora_modules(model)
    np.testing.assert_array_equal(_flax_out(again, x), out)


def test_lora_conversion_errors(tiny, tmp_path, capsys):
    _, _, unet_dir, _ = tiny
    good = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    cases = {
        "missing_module": (
            {
                f"{good}.lora_A.weight": torch.zeros(RANK, 64),
                f"{good}.lora_B.weight": torch.zeros(64, RANK),
                "unet.down_blocks.7.attentions.0.proj_in.lora_A.weight": torch.zeros(RANK, 64),
                "unet.down_blocks.7.attentions.0.proj_in.lora_B.weight": torch.zeros(64, RANK),
            },
            "down_blocks.7.attentions.0.proj_in.lora_A.weight",
        ),
        "bad_shape": (
            {f"{good}.lora_A.weight": torch.zeros(RANK, 65), f"{good}.lora_B.weight": torch.zeros(64, RANK)},
            f"{good}.lora_A.weight",
        ),
        "text_encoder": (
            {
                f"{good}.lora_A.weight": torch.zeros(RANK, 64),
                f"{good}.lora_B.weight": torch.zeros(64, RANK),
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(RANK, 32),
            },
            "skip-text-encoder",
        ),
        "no_up": ({f"{good}.lora_A.weight": torch.zeros(RANK, 64)}, "needs both"),
    }
    for name, (sd, expected) in cases.items():
        save_file(sd, tmp_path / f"{name}.safetensors")
        code = convert_main(
            ["lora", str(tmp_path / f"{name}.safetensors"), str(tmp_path / name), "--unet", str(unet_dir)]
        )
        err = capsys.readouterr().err
        assert code == 1 and expected in err, (name, err)
        assert not (tmp_path / name).exists()
    # The real process exits with status 1 and names the key.
    proc = helpers.run_cli("lora", tmp_path / "bad_shape.safetensors", tmp_path / "x", "--unet", unet_dir, check=False)
    assert proc.returncode == 1 and cases["bad_shape"][1] in proc.stderr, proc.stderr
    # Text-encoder keys can be skipped explicitly (and are counted).
    _cli("lora", tmp_path / "text_encoder.safetensors", tmp_path / "te", "--unet", unet_dir, "--skip-text-encoder")
    assert "skipped 1 text-encoder keys" in capsys.readouterr().out


def test_photomaker_checkpoint(tiny, tmp_path):
    """{'id_encoder', 'lora_weights'} -> DST/id_encoder (same weights) + DST/lora (PhotoMaker's old
    diffusers key style), and the same ID-encoder / LoRA weights come back out."""
    from persongen_jax.models import modeling
    from persongen_jax.models.id_encoder import PhotoMakerIDEncoder
    from weights_conversion import core

    enc_cfg = PhotoMakerIDEncoder.preset_config("tiny")
    enc = PhotoMakerIDEncoder.from_config(enc_cfg, rngs=nnx.Rngs(0))
    enc_sd = {
        core.torch_key(p): torch.from_numpy(np.array(core.to_torch_layout(p, np.asarray(v))))
        for p, v in modeling.flat_params(enc).items()
    }
    weights = _random_lora(_modules(_torch_unet(tiny)), seed=4)
    lora_sd = _old_diffusers_keys(weights)
    torch.save({"id_encoder": enc_sd, "lora_weights": lora_sd}, tmp_path / "photomaker.bin")
    _cli("photomaker", tmp_path / "photomaker.bin", tmp_path / "pm", "--unet", tiny[2])

    got = from_pretrained(tmp_path / "pm" / "id_encoder")
    assert type(got) is PhotoMakerIDEncoder
    want = modeling.flat_params(enc)
    for p, v in modeling.flat_params(got).items():
        np.testing.assert_array_equal(v, want[p], err_msg=str(p))
    params = lora.read_params(tmp_path / "pm" / "lora")
    assert len(params) == 2 * len(weights)
    n = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"
    np.testing.assert_array_equal(params[f"{n}.lora_A.kernel"], weights[n][0].numpy().T)
    np.testing.assert_array_equal(params[f"{n}.lora_B.kernel"], weights[n][1].numpy().T)


def test_kohya_sgm_block_names_match_diffusers():
    """kohya SDXL files name blocks the SGM way (input_blocks_4_1_..., middle_block_1_...,
    output_blocks_0_1_...): our mapping equals diffusers' own (`lora_state_dict`) on the tiny layout."""
    from persongen_jax.models import modeling
    from weights_conversion.lora import _kohya_map, _sgm_to_diffusers

    cfg = helpers.parity_unet_config()
    kohya = _kohya_map(lora.linear_modules(modeling.abstract_model(UNet2DConditionModel, cfg)))
    names = [f"lora_unet_input_blocks_{i}_1_transformer_blocks_{k}_attn1_to_q" for i in (4, 5, 7, 8) for k in (0, 1)]
    names += [f"lora_unet_middle_block_1_transformer_blocks_{k}_attn2_to_out_0" for k in (0, 1)]
    names += [f"lora_unet_output_blocks_{i}_1_transformer_blocks_{k}_attn2_to_k" for i in range(6) for k in (0, 1)]
    sd = {f"{n}.{w}": torch.zeros(1, 1) for n in names for w in ("lora_down.weight", "lora_up.weight")}
    config = type("Cfg", (dict,), {"__getattr__": dict.__getitem__})(
        diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")}).config
    )
    theirs, _ = diffusers.loaders.StableDiffusionXLLoraLoaderMixin.lora_state_dict(sd, unet_config=config)
    theirs = sorted(
        k.removeprefix("unet.")
        .replace(".processor", "")
        .removesuffix("_lora.down.weight")
        .replace("to_out", "to_out.0")
        for k in theirs
        if k.endswith("down.weight")
    )
    assert sorted(kohya[_sgm_to_diffusers(n, cfg)] for n in names) == theirs
