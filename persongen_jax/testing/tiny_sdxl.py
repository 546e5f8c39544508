"""A tiny random SDXL pipeline folder in diffusers layout, built offline.

    make_tiny_sdxl(dst)  ->  dst/model_index.json, unet/, vae/, text_encoder/,
                             text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/

Shapes are SDXL's in miniature: the two text encoders' hidden sizes add up to
the UNet's cross_attention_dim, encoder 2's projection is the pooled
`text_embeds`, the UNet has text_time added conditions. The tokenizer is a real
`CLIPTokenizer` (byte-level BPE): the 512 byte symbols with and without `</w>`,
merges that make the words in `WORDS` single tokens (so class words such as
"man" are one token, as in CLIP's real vocabulary), then <|startoftext|>,
<|endoftext|> as the largest ids, as in CLIP, so legacy argmax pooling finds
the EOS token.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

TEXT_HIDDEN = 32
# Whole-word tokens of the tiny vocabulary (everything else is spelled out in byte symbols).
WORDS = ("a", "an", "the", "of", "in", "on", "with", "and", "photo", "portrait", "man", "woman", "person",
         "boy", "girl", "img", "wearing", "red", "black", "hat", "suit", "street", "city",
         "mountains", "room", "background", "looking", "camera", "smiling")


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

TEXT_ENCODER = dict(vocab_size=VOCAB_SIZE, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                    projection_dim=TEXT_HIDDEN, bos_token_id=VOCAB_SIZE - 2, eos_token_id=2, pad_token_id=1)
TEXT_ENCODER_2 = dict(TEXT_ENCODER, hidden_act="gelu", projection_dim=TEXT_HIDDEN)
UNET = dict(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[32, 64], layers_per_block=2, attention_head_dim=[2, 4],
    transformer_layers_per_block=[1, 2], cross_attention_dim=2 * TEXT_HIDDEN, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=TEXT_HIDDEN + 6 * 8, norm_num_groups=8,
)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64], layers_per_block=1,
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
           norm_num_groups=8, sample_size=32, scaling_factor=0.13025)
# SDXL base scheduler settings (scheduler/scheduler_config.json of stable-diffusion-xl-base-1.0).
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, timestep_spacing="leading", prediction_type="epsilon", interpolation_type="linear",
                 use_karras_sigmas=False, clip_sample=False, sample_max_value=1.0, set_alpha_to_one=False,
                 skip_prk_steps=True)


def _randomize(module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.01), biases N(0, 0.01): no zero/one init."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))


def write_tiny_tokenizer(dst: Path, pad_token: str = "<|endoftext|>") -> None:
    from transformers import CLIPTokenizer

    dst.mkdir(parents=True, exist_ok=True)
    chars = _byte_symbols()
    merges, merged = _bpe_merges()
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + merged
                                            + ["<|startoftext|>", "<|endoftext|>"])}
    assert len(vocab) == VOCAB_SIZE
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], pad_token=pad_token,
                        model_max_length=77)
    tok.save_pretrained(dst)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2/CLIP's table)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


def make_tiny_sdxl(dst: str | Path, seed: int = 0) -> Path:
    """Writes the tiny random SDXL folder at `dst` and returns it."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    models = {
        "unet": UNet2DConditionModel(**UNET),
        "vae": AutoencoderKL(**VAE),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER)),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2)),
    }
    for i, (name, model) in enumerate(models.items()):
        _randomize(model, seed + i)
        model.save_pretrained(dst / name)
    EulerDiscreteScheduler(**{k: v for k, v in SCHEDULER.items()
                              if k not in ("clip_sample", "sample_max_value", "set_alpha_to_one",
                                           "skip_prk_steps")}).save_pretrained(dst / "scheduler")
    write_tiny_tokenizer(dst / "tokenizer")
    write_tiny_tokenizer(dst / "tokenizer_2", pad_token="!")
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
             "force_zeros_for_empty_prompt": True,
             "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (dst / "model_index.json").write_text(json.dumps(index, indent=2))
    return dst
