"""Stage "caption": a vision-language model describes each crop (research: Qwen2.5-VL) -> P_general.

Batches of crops (beam.BatchElements) go to the backend (`vlm.py`: a local transformers folder or an
OpenAI-compatible endpoint). Captions are cached in DST/_work/captions, keyed by image path + the
crop's content hash + the model's fingerprint + the prompt + max tokens: captioning dominates the cost at
scale, and a rerun after a crash (or with different later stages) asks the model only for crops it has
not described yet (Beam counters caption_computed / caption_cached, also in the summary). The prompt is
`prompts/caption.txt` unless --caption-prompt names another file. Rejected: a request that failed
for good (openai backend, after retries) and an empty answer. Newlines in a caption become spaces
(one line per prompt, as the training tokenizer expects).
"""

from __future__ import annotations

from persongen_jax.data.build.common import Item, StageDoFn, WorkCache
from persongen_jax.data.build.settings import cache_key, sha256_text
from persongen_jax.data.build.vlm import load_backend


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines too) as one space, stripped."""
    return " ".join(text.split())


class CaptionImages(StageDoFn):
    """Batches of Items -> Items with `caption`."""

    stage = "caption"

    def setup(self):
        """Once per worker: the captioning backend (a local model is loaded once per process) and the cache."""
        self.backend = load_backend(self.settings.caption)
        self.cache = WorkCache(self.settings.dst, "captions")

    def run(self, batch: list[Item]):
        """A batch of Items -> captioned Items (cached answers reused) or rejects."""
        s = self.settings
        spec = s.caption
        keys = [cache_key("caption", it.image, it.crop_sha256, spec.fingerprint, sha256_text(s.caption_prompt),
                          spec.max_new_tokens) for it in batch]
        answers, computed = self.cache.fetch(
            keys, lambda todo: self.backend.describe([batch[i].jpeg for i in todo], s.caption_prompt),
            keep=lambda a: isinstance(a, str))
        self.count("computed", computed)
        self.count("cached", len(batch) - computed)
        for item, answer in zip(batch, answers):
            if not isinstance(answer, str):
                yield self.rejected(item, "caption request failed", str(answer))
            elif not one_line(answer):
                yield self.rejected(item, "empty caption", "the model answered with no text")
            else:
                item.caption = one_line(answer)
                self.kept()
                yield item
