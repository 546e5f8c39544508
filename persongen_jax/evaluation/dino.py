"""DINO: 100 * the mean over an identity's reference images of cos(DINO embeddings) of a generated image and
the reference (DreamBooth's subject-fidelity metric, PhotoMaker's Table 1).

    scorer = DINOScorer.from_pretrained("weights/dino-vits16")     # `weights_conversion dino`
    refs = scorer.embeddings(reference_images)                      # unit [R, D]
    emb = scorer.embeddings(images)                                 # unit [N, D]

The embedding is `last_hidden_state[:, 0]` of a ViT (transformers `ViTModel`, `models/vit.py`): the CLS
token after the final LayerNorm, not the pooler. Images are preprocessed as transformers'
`ViTImageProcessor` with the folder's preprocessor_config.json (`image_processing.ViTImageProcessor`;
without one, its defaults at the model's image size); transparency is composited onto white as for
CLIP-T. Features run jitted in fixed-size batches sharded over the `data` axis (`ShardedBatches`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from persongen_jax.evaluation.batching import ShardedScorer
from persongen_jax.models.clip import l2_normalize
from persongen_jax.models.vit import ViTModel
from persongen_jax.pipeline.image_processing import CLIPImageProcessor, ViTImageProcessor, check_output_size


@nnx.jit(graph_updates=False)  # read-only: no copy of the module state as an output
def _embed(model, pixel_values):
    return l2_normalize(model(pixel_values).cls.astype(jnp.float32))


class DINOScorer(ShardedScorer):
    def __init__(
        self, model: ViTModel, *, batch_size: int = 32, devices=None, image_processor: CLIPImageProcessor | None = None
    ):
        # a ViTImageProcessor (CLIPImageProcessor's steps with ViT's defaults)
        self.image_size = model.config.image_size
        self.image_processor = image_processor or ViTImageProcessor.at_size(self.image_size)
        check_output_size(self.image_processor, self.image_size, "the image processor", "the DINO ViT")
        super().__init__(model, batch_size=batch_size, devices=devices)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kw) -> "DINOScorer":
        """A folder written by `python -m weights_conversion dino`; ValueError naming it when it holds
        another model."""
        needs = "DINO needs a ViT folder (`python -m weights_conversion dino facebook-dino-vits16 DST`)"
        model = cls.load(directory, ViTModel, needs)
        size = model.config.image_size
        processor = ViTImageProcessor.from_pretrained(directory, size)
        check_output_size(processor, size, f"{Path(directory)}: its processor config", "the DINO ViT")
        return cls(model, image_processor=processor, **kw)

    def embeddings(self, images: Sequence) -> np.ndarray:
        """images (PIL or uint8 [H, W, 3|4]) -> unit CLS embeddings [N, D] (float32)."""
        if not len(images):
            return np.zeros((0, self.model.config.hidden_size), np.float32)
        pix = np.stack([self.image_processor(im) for im in images])
        return self.batches.run(_embed, self.model, pix)
