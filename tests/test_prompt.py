"""Prompt handling: PhotoMaker trigger-word tokenization and the SDXL dual-encoder prompt encoding."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import helpers  # noqa: E402
from flax import nnx  # noqa: E402

from persongen_jax.pipeline import prompt as P  # noqa: E402

PROMPT = "a photo of a man img wearing a red hat"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers tiny SDXL folder, converted folder holding the text encoders and tokenizers)."""
    from persongen_jax.testing.tiny_sdxl import make_tiny_sdxl

    root = tmp_path_factory.mktemp("tiny_prompt")
    src = make_tiny_sdxl(root / "src")
    text_only = root / "text_src"  # convert only what this test needs: faster
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(src / name, text_only / name)
    helpers.run_cli("sdxl", text_only, root / "dst")
    return src, root / "dst"


@pytest.fixture(scope="module")
def tokenizers(tiny):
    return P.load_tokenizers(tiny[1])


@pytest.fixture(scope="module")
def encoders(tiny):
    from persongen_jax.models import from_pretrained

    return from_pretrained(tiny[1] / "text_encoder"), from_pretrained(tiny[1] / "text_encoder_2")


@pytest.fixture(scope="module")
def torch_pipe(tiny):
    from diffusers import StableDiffusionXLPipeline

    helpers.torch_precise()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny[0])
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        tok.model_max_length = 77  # the tiny tokenizer files do not set it (real SDXL ones do)
    return pipe


_encode = nnx.jit(P.encode_prompt)


@pytest.mark.parametrize("n", [1, 3])
def test_trigger_tokenization(tokenizers, n):
    body = ["a</w>", "photo</w>", "of</w>", "a</w>"] + ["man</w>"] * n + ["wearing</w>", "a</w>", "red</w>", "hat</w>"]
    expected_mask = [False] * 5 + [True] * n + [False] * (77 - 5 - n)
    for tok, pad in zip(tokenizers, ("<|endoftext|>", "!")):
        ids, mask = P.tokenize_with_trigger(tok, PROMPT, n)
        assert ids.shape == (77,) and ids.dtype == np.int32 and mask.dtype == bool
        expected = ["<|startoftext|>"] + body + ["<|endoftext|>"] + [pad] * (77 - len(body) - 2)
        assert tok.convert_ids_to_tokens(ids.tolist()) == expected
        assert mask.tolist() == expected_mask
    batch = P.make_prompt_batch(tokenizers, [PROMPT, "a woman img"], [n, 2])
    assert batch.ids_1.shape == batch.ids_2.shape == batch.class_tokens_mask.shape == (2, 77)
    assert batch.class_tokens_mask.sum(1).tolist() == [n, 2]
    assert batch.num_id_images.tolist() == [n, 2]
    np.testing.assert_array_equal(batch.ids_2[0], P.tokenize_with_trigger(tokenizers[1], PROMPT, n)[0])
    # Text-only: the trigger word removed, the class word once, standard SDXL tokenization.
    assert P.text_only_prompt(PROMPT) == "a photo of a man wearing a red hat"
    for k, tok in ((0, tokenizers[0]), (1, tokenizers[1])):
        ids = (batch.text_only_ids_1, batch.text_only_ids_2)[k][0]
        np.testing.assert_array_equal(ids, P.tokenize(tok, "a photo of a man wearing a red hat")[0])
        assert tok.convert_ids_to_tokens(ids[:11].tolist()) == [
            "<|startoftext|>",
            "a</w>",
            "photo</w>",
            "of</w>",
            "a</w>",
            "man</w>",
            "wearing</w>",
            "a</w>",
            "red</w>",
            "hat</w>",
            "<|endoftext|>",
        ]


def test_trigger_errors(tiny, tokenizers, tmp_path):
    tok = tokenizers[1]
    with pytest.raises(ValueError, match=r"prompt 'a photo of a man': the trigger word 'img' is missing"):
        P.tokenize_with_trigger(tok, "a photo of a man", 1)
    with pytest.raises(ValueError, match=r"'a man img and a woman img'.*appears 2 times"):
        P.tokenize_with_trigger(tok, "a man img and a woman img", 1)
    with pytest.raises(ValueError, match=r"'img a man'.*must follow a class word"):
        P.tokenize_with_trigger(tok, "img a man", 1)
    long_prompt = "a photo of " + "a red hat " * 30 + "a man img"
    with pytest.raises(ValueError, match=r"would be cut off by the truncation to 77 tokens"):
        P.tokenize_with_trigger(tok, long_prompt, 1)
    # Class word at token 75: 2 copies fit, 3 would not.
    edge = "a " * 74 + "man img"
    assert P.tokenize_with_trigger(tok, edge, 2)[1][75:].tolist() == [True, True]
    with pytest.raises(ValueError, match="cut off"):
        P.tokenize_with_trigger(tok, edge, 3)
    # A long prompt whose class word comes early is cut like PhotoMaker (no EOS re-appended).
    ids, mask = P.tokenize_with_trigger(tok, "a man img " + "wearing a red hat " * 30, 2)
    assert ids.shape == (77,) and mask[2:4].all() and mask.sum() == 2 and ids[-1] != tok.eos_token_id
    with pytest.raises(ValueError, match="must be a separate word"):
        P.make_prompt_batch(tokenizers, "a man imgur", 1)
    with pytest.raises(ValueError, match="has no added token 'img'"):
        P.tokenize_with_trigger(P.load_tokenizers(tiny[1], trigger_word=None)[1], PROMPT, 1)
    with pytest.raises(FileNotFoundError, match="tokenizer_2"):
        (tmp_path / "m" / "tokenizer").mkdir(parents=True)
        P.load_tokenizers(tmp_path / "m")


def test_encode_prompt_matches_diffusers(tiny, tokenizers, encoders, torch_pipe):
    import torch

    prompts = ["a photo of a man wearing a red hat", "a portrait of a woman in the city"]
    with torch.no_grad():
        ref = torch_pipe.encode_prompt(
            prompts, device="cpu", do_classifier_free_guidance=True, negative_prompt=["black suit", ""]
        )
        ref_zero = torch_pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True)
    te_1, te_2 = encoders
    ours = P.encode_prompts(te_1, te_2, tokenizers, prompts, ["black suit", ""])
    for name, a, b in zip(
        ("embeds", "negative", "pooled", "negative_pooled"), (ours[0], ours[2], ours[1], ours[3]), ref
    ):
        helpers.assert_close(a, b.numpy(), name=name)
    assert ours[0].shape == (2, 77, 64) and ours[1].shape == (2, 32)
    # No negative prompt + force_zeros_for_empty_prompt -> zeros, as diffusers.
    assert P.read_force_zeros_for_empty_prompt(tiny[0])
    zero = P.encode_prompts(te_1, te_2, tokenizers, prompts, None)
    helpers.assert_close(zero[2], ref_zero[1].numpy(), name="zero negative")
    assert not np.asarray(zero[2]).any() and not np.asarray(zero[3]).any()
    # The jitted core on the same ids.
    embeds, pooled = _encode(te_1, te_2, P.tokenize(tokenizers[0], prompts), P.tokenize(tokenizers[1], prompts))
    helpers.assert_close(embeds, ref[0].numpy(), name="jit embeds")
    helpers.assert_close(pooled, ref[2].numpy(), name="jit pooled")


def test_trigger_prompt_encoding_matches_torch(tokenizers, encoders, torch_pipe):
    import torch

    batch = P.make_prompt_batch(tokenizers, [PROMPT, "a portrait of a woman img smiling"], [3, 1])
    te_1, te_2 = encoders
    embeds, pooled = _encode(te_1, te_2, batch.ids_1, batch.ids_2)
    with torch.no_grad():
        out_1 = torch_pipe.text_encoder(torch.from_numpy(batch.ids_1).long(), output_hidden_states=True)
        out_2 = torch_pipe.text_encoder_2(torch.from_numpy(batch.ids_2).long(), output_hidden_states=True)
    ref = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1).numpy()
    helpers.assert_close(embeds, ref, name="prompt_embeds")
    helpers.assert_close(pooled, out_2[0].numpy(), name="pooled")
    text_only, _ = _encode(te_1, te_2, batch.text_only_ids_1, batch.text_only_ids_2)
    with torch.no_grad():
        ref_text_only = torch_pipe.encode_prompt(
            [P.text_only_prompt(PROMPT), "a portrait of a woman smiling"],
            device="cpu",
            do_classifier_free_guidance=False,
        )[0]
    helpers.assert_close(text_only, ref_text_only.numpy(), name="text_only")


def test_strip_trigger_word_agrees_with_generation(tokenizers):
    """CLIP-T's text for a generation prompt (evaluate mode A): the text-only prompt where generation
    accepts the prompt, an error where generation refuses a glued trigger word, unchanged without one."""
    for ok in ["a photo of a man img wearing a red hat", "a man img, smiling", "a woman img"]:
        P.make_prompt_batch(tokenizers, ok, 1)
        assert P.strip_trigger_word(ok) == P.text_only_prompt(ok)
    for glued in ["a man imgur", "a man (img) smiling", "a man,img", "a manimg"]:
        with pytest.raises(ValueError, match="must be a separate word"):
            P.make_prompt_batch(tokenizers, glued, 1)
        with pytest.raises(ValueError, match=rf"prompt '{re.escape(glued)}': the trigger word 'img' must be"):
            P.strip_trigger_word(glued)
    assert P.strip_trigger_word("a portrait of a person") == "a portrait of a person"
    assert P.strip_trigger_word("a man\timg in the city") == "a man in the city"
    assert P.strip_trigger_word("a woman sks", "sks") == "a woman"
