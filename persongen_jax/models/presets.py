"""SDXL model sizes: the config of every component of one SDXL + PhotoMaker model, by name, in one place.

    size = presets.get("tiny")
    size.unet, size.vae, size.text_encoder, size.text_encoder_2, size.id_encoder    # config dicts

    sdxl_base  stabilityai/stable-diffusion-xl-base-1.0 (verbatim configs) + the PhotoMaker v1 ID encoder;
               real weights come from `python -m weights_conversion`, random ones only for shape/memory work
               (scripts/bench/scale.py)
    tiny       SDXL in miniature (two UNet levels, 32-wide text encoders, the tiny byte-level tokenizer of
               `write_tiny_tokenizer`): the demo training run, `--tiny` app/bench runs, CPU tests

A model built with random weights in one of these sizes (`config.model = "<size>"`) tokenizes with the
tiny tokenizer (its ids are valid for every size's vocabulary).
    micro      tiny with one resnet / one transformer layer per block (same widths and conditioning): a train
               step that compiles in about half the time, for the per-config tests

The component classes read these tables (`UNet2DConditionModel.preset_config("tiny")`, ...); the
PyTorch reference folder of the tiny size (`persongen_jax.testing.tiny_sdxl.make_tiny_sdxl`) is built from
the same dicts, so a test's torch model and the demo's Flax model have the same shapes.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from persongen_jax.models import clip, id_encoder

TEXT_HIDDEN = 32  # tiny: both text encoders are 32 wide, so the prompt embedding is 64 = the UNet's cross dim
# Whole-word tokens of the tiny vocabulary (everything else is spelled out in byte symbols).
WORDS = (
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "with",
    "and",
    "photo",
    "portrait",
    "man",
    "woman",
    "person",
    "boy",
    "girl",
    "img",
    "wearing",
    "red",
    "black",
    "hat",
    "suit",
    "street",
    "city",
    "mountains",
    "room",
    "background",
    "looking",
    "camera",
    "smiling",
)


def _bpe_merges(words=WORDS) -> tuple[list[str], list[str]]:
    """Merges that build each word left to right, and the new tokens they create (vocab order)."""
    merges, tokens = [], []
    # Longest words first: their merges get priority, so a short word's merge ("a n</w>" of "an")
    # cannot split a longer one ("m" + "an</w>" for "man").
    for w in sorted(words, key=len, reverse=True):
        syms = list(w[:-1]) + [w[-1] + "</w>"]
        cur = syms[0]
        for nxt in syms[1:]:
            merge = f"{cur} {nxt}"
            cur = cur + nxt
            if merge not in merges:
                merges.append(merge)
                tokens.append(cur)
    return merges, tokens


VOCAB_SIZE = 512 + len(_bpe_merges()[1]) + 2

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (verbatim).
_SDXL_BASE_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# The exact vae/config.json of stabilityai/stable-diffusion-xl-base-1.0 (identical to
# stabilityai/sdxl-vae and madebyollin/sdxl-vae-fp16-fix apart from force_upcast=false in the
# fp16 fix), minus the "_"-prefixed bookkeeping keys. Everything else takes the diffusers
# AutoencoderKL default (shift_factor None, use_quant_conv/use_post_quant_conv/mid_block_add_attention True).
_SDXL_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


_TINY_TEXT_ENCODER = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=TEXT_HIDDEN,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=TEXT_HIDDEN,
    bos_token_id=VOCAB_SIZE - 2,
    eos_token_id=2,
    pad_token_id=1,
)
_TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[32, 64],
    layers_per_block=2,
    attention_head_dim=[2, 4],
    transformer_layers_per_block=[1, 2],
    cross_attention_dim=2 * TEXT_HIDDEN,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=TEXT_HIDDEN + 6 * 8,
    norm_num_groups=8,
)
# Same topology as SDXL's VAE at 2 levels (one downsample), runs in a second on a CPU.
_TINY_VAE = dict(
    _SDXL_VAE,
    block_out_channels=[32, 64],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=32,
)


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """The config dicts (diffusers / transformers / ours) of the five components of one size."""

    unet: dict
    vae: dict
    text_encoder: dict
    text_encoder_2: dict
    id_encoder: dict


SIZES: dict[str, ModelSize] = {
    "sdxl_base": ModelSize(
        unet=_SDXL_BASE_UNET,
        vae=_SDXL_VAE,
        text_encoder=clip.CLIPTextModel.preset_config("sdxl_text_encoder"),
        text_encoder_2=clip.CLIPTextModelWithProjection.preset_config("sdxl_text_encoder_2"),
        id_encoder=id_encoder.PhotoMakerIDEncoder.preset_config("photomaker_v1"),
    ),
    "tiny": ModelSize(
        unet=_TINY_UNET,
        vae=_TINY_VAE,
        text_encoder=_TINY_TEXT_ENCODER,
        text_encoder_2=dict(_TINY_TEXT_ENCODER, hidden_act="gelu"),
        id_encoder=id_encoder.PhotoMakerIDEncoder.preset_config("tiny"),
    ),
}
SIZES["micro"] = dataclasses.replace(
    SIZES["tiny"], unet=dict(_TINY_UNET, layers_per_block=1, transformer_layers_per_block=[1, 1])
)


def get(name: str) -> ModelSize:
    """The model size `name` (a deep copy: callers may edit the dicts)."""
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; expected one of {sorted(SIZES)}")
    return copy.deepcopy(SIZES[name])


def write_tiny_tokenizer(dst: Path, pad_token: str = "<|endoftext|>") -> None:
    """Writes the tiny size's `CLIPTokenizer` (byte-level BPE: the 512 byte symbols with and without `</w>`,
    merges that make each of `WORDS` one token, as class words are in CLIP's real vocabulary, then
    <|startoftext|>, <|endoftext|> as the largest ids, as in CLIP) into `dst`; offline."""
    from transformers import CLIPTokenizer

    dst.mkdir(parents=True, exist_ok=True)
    chars = _byte_symbols()
    merges, merged = _bpe_merges()
    vocab = {
        tok: i
        for i, tok in enumerate(chars + [c + "</w>" for c in chars] + merged + ["<|startoftext|>", "<|endoftext|>"])
    }
    assert len(vocab) == VOCAB_SIZE
    tok = CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(m.split(" ")) for m in merges],  # type: ignore[misc]
        pad_token=pad_token,
        model_max_length=77,
    )
    tok.save_pretrained(dst)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2/CLIP's table)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]
