"""Prompt handling: SDXL's two CLIP tokenizers and text encoders, and PhotoMaker's trigger word.

    tok_1, tok_2 = load_tokenizers(model_dir)                  # trigger word "img" added to both
    batch = make_prompt_batch((tok_1, tok_2), ["a photo of a man img in the city"], num_id_images=[3])
    embeds, pooled = encode_prompt(te_1, te_2, batch.ids_1, batch.ids_2)            # [B, 77, 2048], [B, 1280]
    text_only, text_only_pooled = encode_prompt(te_1, te_2, batch.text_only_ids_1, batch.text_only_ids_2)
    # the ID encoder replaces embeds[batch.class_tokens_mask] with the fused ID vectors

PhotoMaker v1 (`encode_prompt_with_trigger_word`): the prompt is tokenized with
the trigger word as one added token; the trigger token is removed, the token
before it (the class word: "man", "woman", "person", ...) is repeated once per
reference image and those positions are marked in `class_tokens_mask`; then the
ids are cut or padded to 77 (cut: PhotoMaker does not re-append EOS). The
text-only prompt (trigger word removed, class word once) is tokenized the plain
SDXL way (truncation keeps EOS) and is used before `start_merge_step`.

Ids and masks are host numpy arrays (tokenizing is host work); `encode_prompt`
is traceable (wrap it in `nnx.jit`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from persongen_jax.io import read_json

MAX_LENGTH = 77  # CLIP's context length (max_position_embeddings of SDXL's text encoders)
DEFAULT_TRIGGER_WORD = "img"
TOKENIZER_DIRS = ("tokenizer", "tokenizer_2")


def load_tokenizers(model_dir: str | os.PathLike, trigger_word: str = DEFAULT_TRIGGER_WORD):
    """The two `transformers.CLIPTokenizer`s of an SDXL folder (`tokenizer/`, `tokenizer_2/`), with the
    trigger word added to both as one special token (PhotoMaker: `add_tokens([trigger], special_tokens=True)`).
    Pass trigger_word=None to load them unchanged."""
    from transformers import CLIPTokenizer

    model_dir = Path(model_dir)
    missing = [d for d in TOKENIZER_DIRS if not (model_dir / d).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{model_dir}: no tokenizer folder(s) {', '.join(missing)} "
            "(an SDXL model folder has tokenizer/ and tokenizer_2/)"
        )
    tokenizers = []
    for d in TOKENIZER_DIRS:
        try:
            tok = CLIPTokenizer.from_pretrained(model_dir / d)
        except Exception as e:  # transformers' errors do not say which folder
            raise ValueError(f"{model_dir / d}: cannot load a CLIPTokenizer: {e}") from e
        if trigger_word is not None:
            tok.add_tokens([trigger_word], special_tokens=True)
        tokenizers.append(tok)
    return tuple(tokenizers)


def _max_length(tokenizer) -> int:
    # Tokenizer files written without model_max_length report a huge sentinel; CLIP's limit is 77.
    return min(int(tokenizer.model_max_length), MAX_LENGTH)


def tokenize(tokenizer, prompts: str | Sequence[str]) -> np.ndarray:
    """Plain SDXL tokenization (padding="max_length", truncation keeping BOS/EOS): [B, 77] int32."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = tokenizer(prompts, padding="max_length", max_length=_max_length(tokenizer), truncation=True).input_ids
    return np.asarray(ids, dtype=np.int32)


def trigger_token_id(tokenizer, trigger_word: str = DEFAULT_TRIGGER_WORD) -> int:
    """The id of the added trigger-word token; ValueError if the tokenizer does not have it as one token."""
    tid = tokenizer.convert_tokens_to_ids(trigger_word)
    if tid is None or tid == tokenizer.unk_token_id or trigger_word not in tokenizer.get_added_vocab():
        raise ValueError(
            f"the tokenizer has no added token {trigger_word!r}: load it with "
            f"load_tokenizers(model_dir, trigger_word={trigger_word!r})"
        )
    return tid


def _clean_ids(tokenizer, prompt: str, trigger_word: str) -> tuple[list[int], int]:
    """PhotoMaker's scan: (ids with the trigger token removed, index of the class token in them)."""
    image_token_id = trigger_token_id(tokenizer, trigger_word)
    # Untruncated on purpose (the caller truncates SDXL's way): verbose=False drops transformers' "Token indices
    # sequence length is longer than ... (N > 77)" warning, which does not apply here.
    input_ids = tokenizer.encode(prompt, verbose=False)
    clean_index, clean_input_ids, class_token_index = 0, [], []
    for token_id in input_ids:
        if token_id == image_token_id:
            class_token_index.append(clean_index - 1)
        else:
            clean_input_ids.append(token_id)
            clean_index += 1
    if not class_token_index:
        raise ValueError(
            f"prompt {prompt!r}: the trigger word {trigger_word!r} is missing; write it right "
            f"after the class word, e.g. 'a photo of a man {trigger_word}' (it is case-sensitive)"
        )
    if len(class_token_index) > 1:
        raise ValueError(
            f"prompt {prompt!r}: the trigger word {trigger_word!r} appears "
            f"{len(class_token_index)} times; it must appear exactly once"
        )
    index = class_token_index[0]
    if index < 1 or clean_input_ids[index] in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        raise ValueError(
            f"prompt {prompt!r}: the trigger word {trigger_word!r} must follow a class word "
            f"(e.g. 'a man {trigger_word}'), not start the prompt"
        )
    return clean_input_ids, index


def tokenize_with_trigger(
    tokenizer, prompt: str, num_id_images: int, trigger_word: str = DEFAULT_TRIGGER_WORD
) -> tuple[np.ndarray, np.ndarray]:
    """PhotoMaker v1's trigger-word tokenization of one prompt.

    Returns input_ids [77] int32 (trigger removed, class token repeated num_id_images times, cut or padded
    with the tokenizer's pad id to 77) and class_tokens_mask [77] bool (the repeated class tokens).
    ValueError naming the prompt when the trigger word is missing, repeated, first, or when the class
    tokens would be cut off by the truncation to 77.
    """
    if num_id_images < 1:
        raise ValueError(f"num_id_images must be >= 1, got {num_id_images}")
    clean_input_ids, index = _clean_ids(tokenizer, prompt, trigger_word)
    class_token = clean_input_ids[index]
    ids = clean_input_ids[:index] + [class_token] * num_id_images + clean_input_ids[index + 1 :]
    max_len = _max_length(tokenizer)
    if index + num_id_images > max_len:
        raise ValueError(
            f"prompt {prompt!r}: the class word before {trigger_word!r} (token {index}, repeated "
            f"{num_id_images} times) would be cut off by the truncation to {max_len} tokens; "
            "move it earlier or shorten the prompt"
        )
    if len(ids) > max_len:
        ids = ids[:max_len]  # PhotoMaker: plain cut, EOS is not re-appended
    else:
        ids = ids + [tokenizer.pad_token_id] * (max_len - len(ids))
    mask = np.zeros(max_len, dtype=bool)
    mask[index : index + num_id_images] = True
    return np.asarray(ids, dtype=np.int32), mask


def text_only_prompt(prompt: str, trigger_word: str = DEFAULT_TRIGGER_WORD) -> str:
    """The prompt without the trigger word, as PhotoMaker v1: `prompt.replace(" " + trigger_word, "")`."""
    return prompt.replace(" " + trigger_word, "")


def strip_trigger_word(prompt: str, trigger_word: str = DEFAULT_TRIGGER_WORD) -> str:
    """The text CLIP-T scores for a prompt written for generation: the prompt without the trigger word
    (`text_only_prompt`), unchanged when it has none. The trigger word is matched case-sensitively
    anywhere, as the tokenizer's added token is; one glued to another word ("imgur", "a man(img)") is a
    ValueError, as generation refuses it (`make_prompt_batch`): removing it would join or leave words."""
    for m in re.finditer(re.escape(trigger_word), prompt):
        start, end = m.span()
        after = prompt[end : end + 1]
        if start == 0 or not prompt[start - 1].isspace() or after.isalnum() or after == "_":
            raise ValueError(
                f"prompt {prompt!r}: the trigger word {trigger_word!r} must be a separate word "
                f"after the class word (e.g. 'a photo of a man {trigger_word} ...')"
            )
    return re.sub(r"\s" + re.escape(trigger_word), "", prompt)


@flax.struct.dataclass
class PromptBatch:
    """Token ids for a batch of B trigger-word prompts (host numpy, a pytree so it can enter jit).

    ids_1, ids_2:           [B, 77] int32, PhotoMaker ids for tokenizer / tokenizer_2 (class token repeated).
    class_tokens_mask:      [B, 77] bool, the repeated class-token positions (num_id_images[b] per row).
    text_only_ids_1, _2:    [B, 77] int32, the prompt without the trigger word (class word once).
    num_id_images:          [B] int32.
    """

    ids_1: np.ndarray
    ids_2: np.ndarray
    class_tokens_mask: np.ndarray
    text_only_ids_1: np.ndarray
    text_only_ids_2: np.ndarray
    num_id_images: np.ndarray


def make_prompt_batch(
    tokenizers,
    prompts: str | Sequence[str],
    num_id_images: int | Sequence[int],
    trigger_word: str = DEFAULT_TRIGGER_WORD,
) -> PromptBatch:
    """Tokenizes prompts with both tokenizers (see `tokenize_with_trigger`); num_id_images is one count for
    all prompts or one per prompt. Checks that both tokenizers mark the same class positions and that the
    text-only prompt tokenizes to the trigger-free ids (it would not if the trigger word were glued to
    another word, as in "imgur")."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    counts = [num_id_images] * len(prompts) if isinstance(num_id_images, int) else list(num_id_images)
    if len(counts) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(counts)} num_id_images")
    tok_1, tok_2 = tokenizers
    ids: dict[int, list] = {1: [], 2: []}
    text_only: dict[int, list] = {1: [], 2: []}
    masks = []
    for prompt, n in zip(prompts, counts):
        row_masks = []
        for k, tok in ((1, tok_1), (2, tok_2)):
            row_ids, mask = tokenize_with_trigger(tok, prompt, n, trigger_word)
            clean, _ = _clean_ids(tok, prompt, trigger_word)
            plain = text_only_prompt(prompt, trigger_word)
            if tok.encode(plain, verbose=False) != clean:
                raise ValueError(
                    f"prompt {prompt!r}: the trigger word {trigger_word!r} must be a separate word "
                    f"after the class word (without it the prompt reads {plain!r})"
                )
            ids[k].append(row_ids)
            text_only[k].append(tokenize(tok, plain)[0])
            row_masks.append(mask)
        # PhotoMaker uses the second tokenizer's positions; with SDXL's two CLIP BPE tokenizers they agree.
        if not np.array_equal(row_masks[0], row_masks[1]):
            raise ValueError(
                f"prompt {prompt!r}: the two tokenizers put the class word at different positions "
                f"({np.flatnonzero(row_masks[0]).tolist()} vs {np.flatnonzero(row_masks[1]).tolist()})"
            )
        masks.append(row_masks[1])
    return PromptBatch(
        ids_1=np.stack(ids[1]),
        ids_2=np.stack(ids[2]),
        class_tokens_mask=np.stack(masks),
        text_only_ids_1=np.stack(text_only[1]),
        text_only_ids_2=np.stack(text_only[2]),
        num_id_images=np.asarray(counts, dtype=np.int32),
    )


def encode_prompt(
    text_encoder, text_encoder_2, ids_1: jax.typing.ArrayLike, ids_2: jax.typing.ArrayLike
) -> tuple[jax.Array, jax.Array]:
    """SDXL text conditioning: concat(penultimate hidden states of both encoders) [B, 77, D1 + D2] and
    pooled = text_encoder_2's text_embeds [B, P]. Traceable (wrap in nnx.jit)."""
    out_1 = text_encoder(jnp.asarray(ids_1))
    out_2 = text_encoder_2(jnp.asarray(ids_2))
    embeds = jnp.concatenate([out_1.hidden_states[-2], out_2.hidden_states[-2]], axis=-1)
    return embeds, out_2.text_embeds


def read_force_zeros_for_empty_prompt(model_dir: str | os.PathLike) -> bool:
    """`force_zeros_for_empty_prompt` of the folder's model_index.json (diffusers' SDXL default: True)."""
    index = Path(model_dir) / "model_index.json"
    if not index.is_file():
        return True
    return bool(read_json(index).get("force_zeros_for_empty_prompt", True))


def zero_negative(negative_prompt, force_zeros_for_empty_prompt: bool = True) -> bool:
    """diffusers' rule: the unconditional embeddings are zeros when no negative prompt is given (None) and
    the model says force_zeros_for_empty_prompt. An explicit "" is encoded like any prompt."""
    return negative_prompt is None and force_zeros_for_empty_prompt


def encode_prompts(
    text_encoder,
    text_encoder_2,
    tokenizers,
    prompts: str | Sequence[str],
    negative_prompts: str | Sequence[str] | None = None,
    *,
    force_zeros_for_empty_prompt: bool = True,
):
    """diffusers' StableDiffusionXLPipeline.encode_prompt with classifier-free guidance, for plain prompts:
    (prompt_embeds [B, 77, D], pooled [B, P], negative_embeds [B, 77, D], negative_pooled [B, P])."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    embeds, pooled = encode_prompt(
        text_encoder, text_encoder_2, tokenize(tokenizers[0], prompts), tokenize(tokenizers[1], prompts)
    )
    if zero_negative(negative_prompts, force_zeros_for_empty_prompt):
        return embeds, pooled, jnp.zeros_like(embeds), jnp.zeros_like(pooled)
    negative_prompts = negative_prompts or ""
    if isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts] * len(prompts)
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
    neg, neg_pooled = encode_prompt(
        text_encoder,
        text_encoder_2,
        tokenize(tokenizers[0], negative_prompts),
        tokenize(tokenizers[1], negative_prompts),
    )
    return embeds, pooled, neg, neg_pooled
