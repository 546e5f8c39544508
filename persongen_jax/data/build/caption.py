"""Stage "caption": a vision-language model describes each crop (research: Qwen2.5-VL) -> P_general.

Batches of crops (beam.BatchElements) go to the backend (`vlm.py`: a local transformers folder or an
OpenAI-compatible endpoint). Captions are cached in DST/_work/captions, keyed by image path + the
crop's content hash + the model's fingerprint + the prompt + max tokens: captioning dominates the cost at
scale, and a rerun after a crash (or with different later stages) asks the model only for crops it has
not described yet (Beam counters caption_computed / caption_cached, also in the summary). The prompt is
`prompts/caption.txt` unless --caption-prompt names another file. Rejected: an empty answer and a
caption longer than --caption-max-chars (or an answer over the backend's size limit,
`vlm.AnswerTooLong`): what the model said about this image. A request the endpoint failed (openai
backend, after the retries: `vlm.EndpointError`) is not: it goes to the "failed" output and the build
stops, DST as it was (pipeline.build_dataset). Newlines in a caption become spaces (one line per prompt,
as the training tokenizer expects).
"""

from __future__ import annotations

import dataclasses

from persongen_jax.data.build.common import Item, StageDoFn, WorkCache, failed_request
from persongen_jax.data.build.settings import cache_key, sha256_text
from persongen_jax.data.build.vlm import EndpointError, load_backend


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines too) as one space, stripped."""
    return " ".join(text.split())


class CaptionImages(StageDoFn):
    """Batches of Items -> new Items with `caption`."""

    stage = "caption"

    def setup(self):
        """Once per worker: the captioning backend (a local model is loaded once per process) and the cache."""
        self.backend = load_backend(self.settings.caption)
        self.cache = WorkCache(self.settings.dst, "captions")

    def run(self, batch: list[Item]):
        """A batch of Items -> captioned Items (cached answers reused), rejects, or failed outputs (the
        requests the endpoint failed)."""
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
            caption = one_line(answer) if isinstance(answer, str) else ""
            if isinstance(answer, EndpointError):
                self.count("request_failed")
                yield failed_request(item, self.stage, answer)
            elif not isinstance(answer, str):  # vlm.AnswerTooLong
                yield self.rejected(item, "caption too long", str(answer))
            elif not caption:
                yield self.rejected(item, "empty caption", "the model answered with no text")
            elif len(caption) > s.caption_max_chars:
                yield self.rejected(item, "caption too long", f"{len(caption)} characters > --caption-max-chars "
                                                              f"{s.caption_max_chars}: {caption[:80]!r}...")
            else:
                self.kept()
                yield dataclasses.replace(item, caption=caption)
