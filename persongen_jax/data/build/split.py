"""Stage "split": the same (or another) model turns P_general into the texts of the text conditions --
by default P_bg (background) and P_body (clothes, pose, body) -- as strict JSON.

Which texts: `settings.split_fields`, the captions fields that are the text conditions' sources
(conditions.py; default `data.format.DEFAULT_CAPTION_FIELDS`, i.e. caption_bg and caption_body); the
answer's JSON key of a field is its name after "caption_" (`settings.split_key`: the condition's name).
Nothing here names a condition: a new one is a field in --split-fields plus its key in the prompt.

The prompt (`prompts/split.txt`, or --split-prompt) holds `{caption}` where the caption goes and asks
for exactly those keys (checked at start). The answer is accepted when it is a JSON object with exactly
those keys (surrounding whitespace and one Markdown code fence, which chat models add by habit, are
allowed; nothing else): string values, "" for "not mentioned". An answer that does not parse is *not* a
rejection: the image keeps P_general with no P_bg / P_body, and the failure is recorded with its reason
(the "notes" output, index.json["split_failures"], counted in the summary); so is an answer over the
size limit (`vlm.AnswerTooLong`). A request the endpoint failed (`vlm.EndpointError`) is not the
caption's fault: it goes to the "failed" output and the build stops (pipeline.build_dataset). Answers
are cached in DST/_work/splits, keyed by the caption text + the model's fingerprint + the prompt + max
tokens.
"""

from __future__ import annotations

import dataclasses
import json
import re

import apache_beam as beam

from persongen_jax.data.build.caption import one_line
from persongen_jax.data.build.common import NOTES, Item, StageDoFn, WorkCache, failed_request
from persongen_jax.data.build.settings import cache_key, sha256_text, split_key
from persongen_jax.data.build.vlm import EndpointError, load_backend

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_split(answer: str, fields) -> dict[str, str | None]:
    """The model's answer -> {captions field: text or None where empty} for `fields`; ValueError(reason)
    when it is not a JSON object of exactly their keys (`split_key`) with string values."""
    keys = [split_key(f) for f in fields]
    text = answer.strip()
    fence = _FENCE.match(text)
    if fence:
        text = fence.group(1)
    try:
        obj = json.loads(text)
    except ValueError:
        raise ValueError(f"not JSON: {answer[:120]!r}") from None
    if not isinstance(obj, dict) or set(obj) != set(keys):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"expected exactly the keys {keys}, got {got}")
    if not all(isinstance(obj[k], str) for k in keys):
        raise ValueError(f"values must be strings, got {obj!r}"[:200])
    return {f: one_line(obj[k]) or None for f, k in zip(fields, keys)}


class SplitCaptions(StageDoFn):
    """Batches of Items -> Items with `captions` filled ({} on a parse failure, noted)."""

    stage = "split"

    def setup(self):
        """Once per worker: the split backend (shared with the caption stage when it is the same model)
        and the cache."""
        self.backend = load_backend(self.settings.split)
        self.cache = WorkCache(self.settings.dst, "splits")

    def run(self, batch: list[Item]):
        """A batch of captioned Items -> new Items with `captions` (cached answers reused), notes for the
        answers that did not parse, failed outputs for the requests the endpoint failed."""
        s = self.settings
        spec = s.split
        prompts = [s.split_prompt.replace("{caption}", it.caption) for it in batch]
        keys = [cache_key("split", it.caption, spec.fingerprint, sha256_text(s.split_prompt), spec.max_new_tokens)
                for it in batch]
        answers, computed = self.cache.fetch(keys, lambda todo: self.backend.complete([prompts[i] for i in todo]),
                                             keep=lambda a: isinstance(a, str))
        self.count("computed", computed)
        self.count("cached", len(batch) - computed)
        for item, answer in zip(batch, answers):
            if isinstance(answer, EndpointError):
                self.count("request_failed")
                yield failed_request(item, self.stage, answer)
                continue
            try:
                if not isinstance(answer, str):  # vlm.AnswerTooLong
                    raise ValueError(str(answer))
                captions = parse_split(answer, s.split_fields)
                self.count("parsed")
            except ValueError as e:
                captions = {}
                self.count("failed")
                yield beam.pvalue.TaggedOutput(NOTES, dict(image=item.image, person_id=item.person_id, stage="split",
                                                           reason="caption split did not parse", detail=str(e)))
            self.kept()
            yield dataclasses.replace(item, captions=captions)
