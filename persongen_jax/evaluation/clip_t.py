"""CLIP-T: 100 * cos(CLIP image embedding, CLIP text embedding) of a generated image and its prompt;
CLIP-I: 100 * the mean over an identity's reference images of cos(CLIP image embeddings) of the generated
image and the reference (PhotoMaker's Table 1).

    scorer = CLIPTScorer.from_pretrained("weights/clip-vit-large-patch14")   # `weights_conversion clip`
    scores = scorer(images, prompts)                                          # np.float32 [N]
    refs = scorer.image_embeddings(reference_images)                          # unit [R, D]
    clip_i = metrics.mean_cosine_x100(scorer.image_embeddings(images), [refs] * N)   # [N]

Images are preprocessed exactly as transformers' CLIPImageProcessor
(`image_processing.CLIPImageProcessor`) with the model folder's processor config
(processor_config.json / preprocessor_config.json; without one, the defaults at the
vision model's image size); transparency is composited onto white, as transformers
does. Prompts are tokenized with the model folder's CLIP tokenizer (padding to 77,
truncation). Features run jitted in fixed-size batches; with several devices each
batch is sharded over a `data` mesh axis.
No clamping at 0 (torchmetrics' CLIPScore clamps; the research reports the raw
100 * cosine).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from persongen_jax.evaluation.batching import ShardedScorer
from persongen_jax.models.clip import CLIPModel, l2_normalize
from persongen_jax.pipeline.image_processing import CLIPImageProcessor, check_output_size


@nnx.jit(graph_updates=False)  # read-only: no copy of the module state as an output
def _scores(model, pixel_values, input_ids):
    image = l2_normalize(model.get_image_features(pixel_values).astype(jnp.float32))
    text = l2_normalize(model.get_text_features(input_ids).astype(jnp.float32))
    return 100.0 * jnp.sum(image * text, axis=-1)


@nnx.jit(graph_updates=False)
def _image_embeddings(model, pixel_values):
    return l2_normalize(model.get_image_features(pixel_values).astype(jnp.float32))


class CLIPTScorer(ShardedScorer):
    def __init__(
        self, model, tokenizer, *, batch_size: int = 32, devices=None, image_processor: CLIPImageProcessor | None = None
    ):
        self.tokenizer = tokenizer
        self.image_size = model.config.vision_config.image_size
        self.image_processor = image_processor or CLIPImageProcessor.at_size(self.image_size)
        check_output_size(self.image_processor, self.image_size, "the image processor", "the CLIP vision model")
        super().__init__(model, batch_size=batch_size, devices=devices)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kw) -> "CLIPTScorer":
        from transformers import CLIPTokenizer

        directory = Path(directory)
        model = cls.load(directory, CLIPModel, "CLIP-T needs a CLIPModel (text + vision)")
        try:
            tokenizer = CLIPTokenizer.from_pretrained(directory)
        except (OSError, ValueError) as e:
            raise ValueError(f"{directory}: no CLIP tokenizer files next to the model ({e})") from None
        size = model.config.vision_config.image_size
        processor = CLIPImageProcessor.from_pretrained(directory, size)
        check_output_size(processor, size, f"{directory}: its processor config", "the CLIP vision model")
        return cls(model, tokenizer, image_processor=processor, **kw)

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        return self.tokenizer(
            list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="np"
        ).input_ids.astype(np.int32)

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> np.ndarray:
        """images: PIL images or uint8 arrays [H, W, 3] (or 4 with alpha); prompts: one per image -> scores [N]."""
        if len(images) != len(prompts):
            raise ValueError(f"CLIP-T: {len(images)} images but {len(prompts)} prompts")
        if not len(images):
            return np.zeros((0,), np.float32)
        pix = np.stack([self.image_processor(im) for im in images])
        return self.batches.run(_scores, self.model, pix, self.tokenize(prompts))

    def image_embeddings(self, images: Sequence) -> np.ndarray:
        """images (PIL or uint8 [H, W, 3|4]) -> unit `get_image_features` embeddings [N, D] (float32), the
        images preprocessed as for CLIP-T."""
        if not len(images):
            return np.zeros((0, self.model.config.projection_dim), np.float32)
        pix = np.stack([self.image_processor(im) for im in images])
        return self.batches.run(_image_embeddings, self.model, pix)
