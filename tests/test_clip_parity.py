"""CLIP text/vision encoders: parity with transformers (fp32, randomised weights, tiny configs).

Tolerance: rtol = atol = 1e-4 on every compared output.
"""

from __future__ import annotations

import math

import helpers  # tests/ is on sys.path (rootdir conftest, no package)
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persongen_jax.models import clip, modeling
from weights_conversion import core

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

B, T = 3, 12  # T < max_position_embeddings (16) on purpose
EOT = 999  # highest id of the tiny vocab, like CLIP's 49407


def _tiny_text(**over) -> dict:
    cfg = clip.CLIPTextModel.preset_config("tiny")
    cfg.update(num_hidden_layers=3, **over)
    return cfg


def _load(cls, torch_model, tmp_path):
    """save_pretrained (transformers' own format) -> `python -m weights_conversion clip` -> our module."""
    src = tmp_path / "src"
    torch_model.save_pretrained(src)
    model = helpers.convert_and_load("clip", src, tmp_path / "dst")
    assert type(model) is cls
    return model


def _torch_model(torch_cls, config_cls, cfg: dict, seed: int):
    helpers.torch_precise()
    model = torch_cls(config_cls(**cfg)).eval()
    helpers.randomize_(model, seed=seed)
    return model


@nnx.jit
def _call(model, *args):
    return model(*args)


def _np(t):
    return t.detach().cpu().numpy()


# ----------------------------------------------------------------------------- text


def _text_inputs(rule: str):
    """ids [B, T] and attention_mask [B, T] with padding and EOS not at the end.

    legacy rule (eos_token_id == 2): the pooled token is the highest id (EOT); rows padded
    with EOT (SDXL tokenizer) or with 0 (SDXL tokenizer_2).
    new rule (eos_token_id = 500): the first 500 is pooled although larger ids follow it.
    """
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 480, size=(B, T))
    mask = np.ones((B, T), np.int64)
    eos = EOT if rule == "legacy" else 500
    ids[0, -1] = eos  # full row, EOS last
    ids[1, 5] = eos  # EOS mid-sequence, padding after it
    ids[1, 6:] = EOT if rule == "legacy" else 1
    mask[1, 6:] = 0
    ids[2, 3] = eos
    ids[2, 4:] = 0 if rule == "legacy" else rng.integers(501, 999, size=T - 4)  # larger ids after EOS
    mask[2, 8:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def text_legacy(tmp_path_factory):
    """SDXL text_encoder kind: CLIPTextModel, quick_gelu, eos_token_id 2 (argmax pooling)."""
    cfg = _tiny_text(hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
    tm = _torch_model(transformers.CLIPTextModel, transformers.CLIPTextConfig, cfg, seed=1)
    return tm, _load(clip.CLIPTextModel, tm, tmp_path_factory.mktemp("text_legacy"))


@pytest.fixture(scope="module")
def text_proj(tmp_path_factory):
    """SDXL text_encoder_2 kind: CLIPTextModelWithProjection, gelu, first-EOS pooling."""
    cfg = _tiny_text(hidden_act="gelu", bos_token_id=499, eos_token_id=500, pad_token_id=1, layer_norm_eps=1e-6)
    tm = _torch_model(transformers.CLIPTextModelWithProjection, transformers.CLIPTextConfig, cfg, seed=2)
    return tm, _load(clip.CLIPTextModelWithProjection, tm, tmp_path_factory.mktemp("text_proj"))


def _run_text(models, rule: str, use_mask: bool):
    """(ours, transformers') outputs of a (torch model, our model) pair on `_text_inputs(rule)`, every layer's
    hidden states included (4 of them: embeddings + 3 layers)."""
    tm, model = models
    ids, mask = _text_inputs(rule)
    with torch.no_grad():
        ref = tm(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask) if use_mask else None,
            output_hidden_states=True,
        )
    out = _call(model, jnp.asarray(ids), jnp.asarray(mask) if use_mask else None)
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    return out, ref


@pytest.mark.parametrize("use_mask", [False, True])
def test_text_model_legacy_pooling(text_legacy, use_mask):
    out, ref = _run_text(text_legacy, "legacy", use_mask)
    helpers.assert_close(out.last_hidden_state, _np(ref.last_hidden_state), name="last_hidden_state")
    helpers.assert_close(out.hidden_states[0], _np(ref.hidden_states[0]), name="hidden_states[0]")
    helpers.assert_close(out.hidden_states[-2], _np(ref.hidden_states[-2]), name="hidden_states[-2]")
    helpers.assert_close(out.hidden_states[-1], _np(ref.hidden_states[-1]), name="hidden_states[-1]")
    helpers.assert_close(out.pooler_output, _np(ref.pooler_output), name="pooler_output")


@pytest.mark.parametrize("use_mask", [False, True])
def test_text_model_with_projection_eos_pooling(text_proj, use_mask):
    out, ref = _run_text(text_proj, "eos", use_mask)
    helpers.assert_close(out.last_hidden_state, _np(ref.last_hidden_state), name="last_hidden_state")
    helpers.assert_close(out.hidden_states[-2], _np(ref.hidden_states[-2]), name="hidden_states[-2]")
    helpers.assert_close(out.text_embeds, _np(ref.text_embeds), name="text_embeds")
    # pooled token = first EOS (index 3 in row 2), not the highest id after it
    pooled = np.asarray(out.pooler_output)
    np.testing.assert_allclose(pooled[2], np.asarray(out.last_hidden_state)[2, 3], rtol=0, atol=0)


def test_hub_layout_checkpoint_converts(text_legacy):
    """Hub/older checkpoints: `text_model.` prefix and a stored `position_ids` buffer."""
    tm, model = text_legacy
    sd = {"text_model." + k: v for k, v in tm.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    flat = core.convert_state_dict(
        clip.CLIPTextModel, clip.CLIPTextModel.preset_config("tiny") | {"num_hidden_layers": 3}, sd
    )
    ours = modeling.flat_params(model)
    assert set(flat) == set(ours)
    for p in flat:
        np.testing.assert_array_equal(flat[p], np.asarray(ours[p]), err_msg=modeling.path_str(p))


# ----------------------------------------------------------------------------- vision


@pytest.fixture(scope="module")
def vision_proj(tmp_path_factory):
    cfg = clip.CLIPVisionModelWithProjection.preset_config("tiny")
    cfg.update(num_hidden_layers=3)
    tm = _torch_model(transformers.CLIPVisionModelWithProjection, transformers.CLIPVisionConfig, cfg, seed=3)
    return tm, _load(clip.CLIPVisionModelWithProjection, tm, tmp_path_factory.mktemp("vision_proj"))


def _pixels(n=2, size=30, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)  # NCHW


def test_vision_model_with_projection(vision_proj):
    tm, model = vision_proj
    px = _pixels()
    with torch.no_grad():
        ref = tm(torch.from_numpy(px), output_hidden_states=True)
    out = _call(model, jnp.asarray(px.transpose(0, 2, 3, 1)))  # ours: NHWC
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    helpers.assert_close(out.image_embeds, _np(ref.image_embeds), name="image_embeds")
    helpers.assert_close(out.last_hidden_state, _np(ref.last_hidden_state), name="last_hidden_state")
    helpers.assert_close(out.hidden_states[0], _np(ref.hidden_states[0]), name="hidden_states[0]")
    helpers.assert_close(out.hidden_states[-2], _np(ref.hidden_states[-2]), name="hidden_states[-2]")


def test_vision_model_rejects_wrong_size(vision_proj):
    _, model = vision_proj
    with pytest.raises(ValueError, match="image size"):
        model(jnp.zeros((1, 24, 24, 3)))


def test_bare_vision_model(tmp_path):
    cfg = clip.CLIPVisionModel.preset_config("tiny")
    tm = _torch_model(transformers.CLIPVisionModel, transformers.CLIPVisionConfig, cfg, seed=4)
    model = _load(clip.CLIPVisionModel, tm, tmp_path)
    px = _pixels(n=1, seed=1)
    with torch.no_grad():
        ref = tm(torch.from_numpy(px))
    out = _call(model, jnp.asarray(px.transpose(0, 2, 3, 1)))
    helpers.assert_close(out.pooler_output, _np(ref.pooler_output), name="pooler_output")
    helpers.assert_close(out.last_hidden_state, _np(ref.last_hidden_state), name="last_hidden_state")


# ----------------------------------------------------------------------------- CLIPModel


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    cfg = clip.CLIPModel.preset_config("tiny")
    cfg["text_config"].update(eos_token_id=2, bos_token_id=0)  # OpenAI configs use the legacy rule
    tm = _torch_model(transformers.CLIPModel, transformers.CLIPConfig, cfg, seed=5)
    with torch.no_grad():
        tm.logit_scale.fill_(2.0)
    return tm, _load(clip.CLIPModel, tm, tmp_path_factory.mktemp("clip"))


def test_clip_model_features(clip_model):
    tm, model = clip_model
    ids, mask = _text_inputs("legacy")
    px = _pixels(n=2, seed=2)
    with torch.no_grad():
        ref_t = tm.get_text_features(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        ref_i = tm.get_image_features(torch.from_numpy(px))
        ref = tm(
            input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(px), attention_mask=torch.from_numpy(mask)
        )
    ref_t = getattr(ref_t, "pooler_output", ref_t)  # v5 returns an output object, v4 a tensor
    ref_i = getattr(ref_i, "pooler_output", ref_i)
    text = nnx.jit(lambda m, i, a: m.get_text_features(i, a))(model, jnp.asarray(ids), jnp.asarray(mask))
    image = nnx.jit(lambda m, x: m.get_image_features(x))(model, jnp.asarray(px.transpose(0, 2, 3, 1)))
    helpers.assert_close(text, _np(ref_t), name="get_text_features")
    helpers.assert_close(image, _np(ref_i), name="get_image_features")
    out = _call(model, jnp.asarray(ids), jnp.asarray(px.transpose(0, 2, 3, 1)), jnp.asarray(mask))
    helpers.assert_close(out.logits_per_image, _np(ref.logits_per_image), name="logits_per_image")


# ----------------------------------------------------------------------------- configs


PRESETS = [
    (clip.CLIPTextModel, "sdxl_text_encoder", "CLIPTextModel", "CLIPTextConfig"),
    (clip.CLIPTextModel, "tiny", "CLIPTextModel", "CLIPTextConfig"),
    (clip.CLIPTextModelWithProjection, "sdxl_text_encoder_2", "CLIPTextModelWithProjection", "CLIPTextConfig"),
    (clip.CLIPTextModelWithProjection, "tiny", "CLIPTextModelWithProjection", "CLIPTextConfig"),
    (clip.CLIPVisionModelWithProjection, "vit_large_patch14", "CLIPVisionModelWithProjection", "CLIPVisionConfig"),
    (clip.CLIPVisionModel, "tiny", "CLIPVisionModel", "CLIPVisionConfig"),
    (clip.CLIPModel, "clip_vit_large_patch14", "CLIPModel", "CLIPConfig"),
]


@pytest.mark.parametrize("cls,preset,torch_cls,torch_cfg", PRESETS, ids=[f"{p[0].__name__}-{p[1]}" for p in PRESETS])
def test_preset_param_count_matches_transformers(cls, preset, torch_cls, torch_cfg):
    from transformers.initialization import no_init_weights  # init on meta is slow and pointless

    cfg = cls.preset_config(preset)
    with torch.device("meta"), no_init_weights():
        tm = getattr(transformers, torch_cls)(getattr(transformers, torch_cfg)(**cfg))
    expected = sum(p.numel() for p in tm.parameters())
    shapes = modeling.flat_params(modeling.abstract_model(cls, cfg))
    assert sum(math.prod(s.shape) for s in shapes.values()) == expected


def test_preset_sizes():
    c = clip.parse_text_config(clip.CLIPTextModelWithProjection.preset_config("sdxl_text_encoder_2"))
    assert (
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.intermediate_size,
        c.projection_dim,
        c.hidden_act,
    ) == (1280, 32, 20, 5120, 1280, "gelu")
    v = clip.parse_vision_config(clip.CLIPVisionModelWithProjection.preset_config("vit_large_patch14"))
    assert (v.image_size, v.patch_size, v.projection_dim, v.hidden_size) == (224, 14, 768, 1024)
    with pytest.raises(ValueError, match="unknown preset"):
        clip.CLIPTextModel.preset_config("nope")


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="hidden_act"):
        clip.parse_text_config(_tiny_text(hidden_act="swiglu"))
    with pytest.raises(ValueError, match="vision_config.hidden_act"):
        cfg = clip.CLIPModel.preset_config("tiny")
        cfg["vision_config"]["hidden_act"] = "mish"
        clip.parse_clip_config(cfg)
    with pytest.raises(ValueError, match="model_type"):
        clip.parse_text_config(clip.CLIPVisionModel.preset_config("tiny"))
    with pytest.raises(ValueError, match="patch_size"):
        clip.parse_vision_config(clip.CLIPVisionModel.preset_config("tiny") | {"patch_size": [6, 5]})
    with pytest.raises(ValueError, match="attention_dropout"):
        clip.parse_text_config(_tiny_text(attention_dropout=0.1))


def test_bf16_compute_runs(text_legacy):
    """dtype=bfloat16 compute with fp32 params: same structure, finite, close-ish."""
    _, model = text_legacy
    cfg = _tiny_text(hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2)
    bf = modeling.assign_params(
        modeling.abstract_model(clip.CLIPTextModel, cfg, dtype=jnp.bfloat16), modeling.flat_params(model)
    )
    ids, _ = _text_inputs("legacy")
    out = _call(bf, jnp.asarray(ids), None)
    ref = _call(model, jnp.asarray(ids), None)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out.pooler_output, np.float32), np.asarray(ref.pooler_output), atol=0.15, rtol=0.05
    )
