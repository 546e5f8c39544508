"""Stage "mark": the trigger word goes right after the first class word of P_general (PhotoMaker's rule):
"a photo of a man wearing a red suit" -> "a photo of a man img wearing a red suit".

Class words (`--class-words`, default conditions.CLASS_WORDS: man, woman, person, boy, girl, ... and their
plurals) match as whole words, case-insensitively; punctuation after the word stays after the trigger
("a man, smiling" -> "a man img, smiling"). Rejected: a caption without any class word (training
could not attach the identity to anything) and a caption that already holds the trigger word (it must
appear exactly once).
"""

from __future__ import annotations

import dataclasses
import re

from persongen_jax.data.build.common import Item, StageDoFn


def insert_trigger(caption: str, class_words, trigger_word: str) -> str:
    """-> the caption with `trigger_word` after its first class word; ValueError(reason) without one."""
    if re.search(rf"(?<![\w-]){re.escape(trigger_word)}(?![\w-])", caption, re.IGNORECASE):
        raise ValueError(f"already holds the trigger word {trigger_word!r}")
    words = "|".join(re.escape(w) for w in sorted(class_words, key=len, reverse=True))
    m = re.search(rf"(?<![\w-])({words})(?![\w-])", caption, re.IGNORECASE)
    if m is None:
        raise ValueError(f"no class word ({', '.join(class_words)})")
    return f"{caption[:m.end()]} {trigger_word}{caption[m.end():]}"


class MarkTrigger(StageDoFn):
    """Captioned Items -> Items whose caption holds the trigger word; rejects captions without a class word."""
    stage = "mark"

    def run(self, item: Item):
        """Inserts the trigger word (see `insert_trigger`)."""
        s = self.settings
        try:
            caption = insert_trigger(item.caption, s.class_words, s.trigger_word)
        except ValueError as e:
            reason = "no class word" if str(e).startswith("no class word") else "trigger word in caption"
            yield self.rejected(item, reason, f"{e}: {item.caption[:200]!r}")
            return
        self.kept()
        yield dataclasses.replace(item, caption=caption)
