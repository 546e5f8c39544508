"""Conditions as data: every conditioning signal besides the main prompt, declared once.

The method conditions the UNet on the prompt P_general (the text cross-attention, with PhotoMaker's ID
tokens fused in) and on extra signals through adapter cross-attentions (`models.attention_processor`):
the identity (image kind: the reference faces), P_bg and P_body (text kind), and whatever a research step
adds next. Each is a `Condition` listed in the training config:

    c.conditions.bg = dict(kind="text", source="caption_bg", drop=0.1)          # configs/default.py

and every stage loops over the declared conditions instead of naming them:

    data        a text condition's text is the record field `source` -> batch keys <name>_ids_1,
                <name>_ids_2 (token ids) and has_<name> (bool); an image condition reads the references
                (id_pixel_values, num_id_images)
    loss        condition dropout with probability `drop` (classifier-free guidance training)
    model       `config.adapters.names` chooses which conditions get adapter layers, in wiring order
    sampling    a `gated` condition enters only after `start_merge_step` (PhotoMaker v1's rule for the ID)
    generate    `--cond NAME=TEXT` for text conditions (`--prompt-bg` / `--prompt-body` are aliases)
    evaluation  a validation prompt's split texts are keyed by condition name
    web app     one text field per text condition of the loaded model (`label`, `describe`)

Adding a text condition is one config entry (plus its name in `config.adapters.names` and its field in
the dataset's captions JSONL); no code changes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping

KINDS = ("text", "image")
# The class words: the word of P_general that the trigger word follows and that the identity replaces
# (PhotoMaker: "the trigger word `img` must follow the class word", e.g. man, woman, girl, boy; its
# repository publishes no longer list), singular first, then plurals and informal words. One list for the
# demo data, the synthetic training data and the dataset build's marking (`--class-words`).
CLASS_WORDS = (
    "man",
    "woman",
    "person",
    "boy",
    "girl",
    "men",
    "women",
    "people",
    "boys",
    "girls",
    "guy",
    "lady",
    "child",
    "kid",
)
# The record field an image condition reads: the reference faces of the person (the dataset's persons).
REFERENCES = "references"


@dataclasses.dataclass(frozen=True)
class Condition:
    """One conditioning signal.

    name: a lower-case identifier (the adapter name and the batch-key prefix).
    kind: "text" (a caption field, through the text encoders) or "image" (the reference faces, through the
      ID encoder and the adapter's image projection).
    source: text: the record / captions-JSONL field holding its text ("caption_bg"); image: "references".
    drop: probability of dropping it for a training example (classifier-free guidance).
    gated: applied only after `start_merge_step` during sampling (the identity, as PhotoMaker v1).
    """

    name: str
    kind: str
    source: str
    drop: float = 0.1
    gated: bool = False

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"condition name {self.name!r}: expected a lower-case identifier")
        if self.kind not in KINDS:
            raise ValueError(f"condition {self.name!r}: kind {self.kind!r}; expected one of {list(KINDS)}")
        if self.kind == "image" and self.source != REFERENCES:
            raise ValueError(f"condition {self.name!r}: an image condition reads {REFERENCES!r}, not {self.source!r}")
        if self.kind == "text" and not self.source:
            raise ValueError(f"condition {self.name!r}: a text condition needs `source` (its captions field)")
        if not 0.0 <= float(self.drop) <= 1.0:
            raise ValueError(f"condition {self.name!r}: drop {self.drop} is not a probability")

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """The training-batch arrays this condition reads."""
        if self.kind == "image":
            return ("id_pixel_values", "num_id_images")
        return text_keys(self.name)


def text_keys(name: str) -> tuple[str, str, str]:
    """Batch keys of text condition `name`: token ids for the two tokenizers [B, 77] and presence [B]."""
    return f"{name}_ids_1", f"{name}_ids_2", f"has_{name}"


# What an old run folder (its config.json written before conditions were config entries) and
# `configs/default.py` declare: the identity (gated, as PhotoMaker v1), P_bg and P_body.
DEFAULTS: dict[str, dict[str, Any]] = {
    "id": dict(kind="image", source=REFERENCES, drop=0.1, gated=True),
    "bg": dict(kind="text", source="caption_bg", drop=0.1),
    "body": dict(kind="text", source="caption_body", drop=0.1),
}


# What the research's text conditions hold, for the help text of a field that takes one (the web app).
DESCRIPTIONS: dict[str, str] = {
    "bg": "the background: where the person is, e.g. 'in the mountains at sunset'",
    "body": "the body: clothes and pose, e.g. 'wearing a black cloak and a red hat'",
}


def label(name: str) -> str:
    """A text condition as the research writes it: P_<name> (P_bg, P_body)."""
    return f"P_{name}"


def describe(name: str) -> str:
    """What text condition `name` holds (DESCRIPTIONS; a generic line for a condition added later)."""
    return DESCRIPTIONS.get(name, f"text of the '{name}' condition (its adapter)")


def parse(table: Mapping[str, Mapping[str, Any]]) -> dict[str, Condition]:
    """{name: {kind, source, drop, gated}} (a config's `conditions`) -> {name: Condition}, in table order."""
    out = {}
    for name, spec in table.items():
        spec = dict(spec)
        unknown = sorted(set(spec) - {f.name for f in dataclasses.fields(Condition)} - {"name"})
        if unknown:
            raise ValueError(f"config.conditions.{name}: unknown keys {unknown} (expected kind, source, drop, gated)")
        spec.pop("name", None)
        try:
            out[name] = Condition(name=name, **spec)
        except TypeError as e:
            raise ValueError(f"config.conditions.{name}: {e}") from None
    images = [c.name for c in out.values() if c.kind == "image"]
    if len(images) > 1:
        raise ValueError(f"config.conditions: one image condition (the references) at most, got {images}")
    return out


def from_config(config) -> dict[str, Condition]:
    """The conditions declared by a training config (`config.conditions`; DEFAULTS for run folders that
    predate it)."""
    table = config.get("conditions") if hasattr(config, "get") else None
    if table is None:
        table = DEFAULTS
    elif hasattr(table, "to_dict"):
        table = table.to_dict()
    return parse(table)


def text_conditions(conditions: Mapping[str, Condition], names: Iterable[str] | None = None) -> list[Condition]:
    """The text conditions, optionally only those in `names` (e.g. the model's adapters), in `names` order."""
    if names is None:
        return [c for c in conditions.values() if c.kind == "text"]
    return [conditions[n] for n in names if n in conditions and conditions[n].kind == "text"]


def image_condition(conditions: Mapping[str, Condition]) -> Condition | None:
    """The image condition (the references), if one is declared."""
    return next((c for c in conditions.values() if c.kind == "image"), None)


def infer(adapter_names: Iterable[str], image_condition_name: str | None) -> dict[str, Condition]:
    """Conditions of a model known only from its adapter folder: the image projection's condition is the
    (gated) image condition, every other adapter is a text condition read from `caption_<name>`."""
    out = {}
    for n in adapter_names:
        if n == image_condition_name:
            out[n] = Condition(n, "image", REFERENCES, gated=True)
        else:
            out[n] = Condition(n, "text", f"caption_{n}")
    return out
