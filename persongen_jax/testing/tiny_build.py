"""Offline stand-ins for the dataset-construction pipeline (`persongen_jax.data.build`): tests and benchmarks.

    make_key_detector("det/")                  # det/det_key.onnx: SCRFD layout, finds key-coloured faces
    make_raw_persons("src/", BUILD_SET)        # src/persons/<id>/<name>.jpg, faces where the detector finds them
    make_tiny_qwen2_5_vl("qwen/")              # random Qwen2.5-VL folder (config, weights, tokenizer, processor)
    with CaptionServer() as server:            # OpenAI-compatible chat-completions endpoint on 127.0.0.1
        ... --caption-backend openai --caption-endpoint {server.url} ...

**Key-colour faces.** A real SCRFD needs trained weights; this detector has SCRFD's exact output layout
(scores / box distances / keypoint offsets for strides 8, 16, 32, 2 anchors per cell, fixed input size)
but finds faces by colour: "slot A" faces are painted with the green channel at 255 and blue <= 120,
"slot B" faces with blue at 255 and green <= 120; backgrounds and bodies keep green and blue <= 140. In the
normalised input it thresholds each key, erodes the mask (so JPEG ringing and resize blur at the edges do
not count), and reports per slot one face: the mask's bounding box (re-grown by the erosion radius) and 5
landmarks at the ArcFace template's relative positions inside it, from anchor k of the stride-32 cell
(0, 0) -- through the same decode / NMS / rescale code as a real file. Slot B reports the higher score,
so neither "most confident" nor (when drawn larger) "largest" picks a slot-A person: only identity
verification does.

A person's identity is the pattern inside the face (stripe colours, angle, period, eye spacing), as in
`make_demo`; a random ArcFace IResNet (`tiny_eval.make_tiny_arcface`) maps faces of one person to nearby
embeddings and different persons apart (the thresholds the tests use are measured for the seeds there).
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

KEY_HI, KEY_LO = 255, 120  # key channel value / the other key channel's maximum inside a face
BG_MAX = 140  # green and blue never exceed this outside faces
# The random ArcFace of the build tests (`tiny_eval.make_tiny_arcface(folder, **BUILD_ARCFACE)`, seed 0) and
# the cosine threshold that separates the synthetic identities under it: measured on the test tree, faces of
# one identity are >= 0.90 apart, of different identities <= 0.81.
BUILD_ARCFACE = dict(layers=[2, 2, 2, 2], widths=[8, 16, 16, 32], num_features=64, input_size=112)
BUILD_THRESHOLD = 0.85


# ----------------------------------------------------------------------------------------------- detector


def make_key_detector(folder: str | Path, *, input_size: int = 320, erode: int = 2) -> Path:
    """folder/det_key.onnx: finds slot-A (green key) and slot-B (blue key) faces (see module doc)."""
    import torch
    from torch import nn

    from persongen_jax.evaluation.faces import ARCFACE_TEMPLATE
    from persongen_jax.testing.tiny_eval import export_onnx

    if input_size % 32:
        raise ValueError(f"input_size must be a multiple of 32, got {input_size}")
    strides = (8, 16, 32)
    S = input_size
    norm = lambda v: (v - 127.5) / 128.0  # noqa: E731  (the detector's input normalisation)
    hi, lo = norm(200.0), norm(170.0)  # JPEG / resize tolerance around KEY_HI, KEY_LO and BG_MAX
    rel_kps = torch.from_numpy(ARCFACE_TEMPLATE / 112.0)  # [5, 2] landmark positions inside the box

    class KeySCRFD(nn.Module):
        def forward(self, x):
            r, g, b = x[:, 0], x[:, 1], x[:, 2]
            del r
            ys = torch.arange(S, dtype=torch.float32).view(1, S, 1)
            xs = torch.arange(S, dtype=torch.float32).view(1, 1, S)
            scores, boxes, kpss = [], [], []
            for key, other, score in ((g, b, 0.98), (b, g, 0.99)):
                m = ((key >= hi) & (other <= lo)).float().unsqueeze(1)  # [1, 1, S, S]
                m = -nn.functional.max_pool2d(-m, 2 * erode + 1, stride=1, padding=erode)[:, 0]  # erosion
                n = m.sum()
                big = 1e4
                x0 = (xs + big * (1 - m)).amin() - erode
                y0 = (ys + big * (1 - m)).amin() - erode
                x1 = (xs - big * (1 - m)).amax() + 1 + erode
                y1 = (ys - big * (1 - m)).amax() + 1 + erode
                present = torch.sigmoid(n - 20.0)  # ~1 for a face of >= ~25 eroded pixels
                scores.append(score * present)
                # anchor centre (0, 0): distances are the box corners themselves, in stride units
                boxes.append(torch.stack([-x0, -y0, x1, y1]) / 32.0)
                wh = torch.stack([x1 - x0, y1 - y0])
                kps = torch.stack([x0, y0]) + rel_kps * wh  # [5, 2]
                kpss.append(kps.reshape(-1) / 32.0)
            outs_s, outs_b, outs_k = [], [], []
            for s in strides:
                n_anchor = (S // s) ** 2 * 2
                sc = torch.zeros(n_anchor, 1) + 0.0 * x.mean()
                bx = torch.zeros(n_anchor, 4) + 0.0 * x.mean()
                kp = torch.zeros(n_anchor, 10) + 0.0 * x.mean()
                if s == 32:  # anchors 0 and 1 of cell (0, 0): slot A, slot B
                    sc = torch.cat([torch.stack(scores).view(2, 1), sc[2:]])
                    bx = torch.cat([torch.stack(boxes), bx[2:]])
                    kp = torch.cat([torch.stack(kpss), kp[2:]])
                outs_s.append(sc)
                outs_b.append(bx)
                outs_k.append(kp)
            return (*outs_s, *outs_b, *outs_k)

    names = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in strides]
    return export_onnx(
        KeySCRFD().eval(),
        Path(folder) / "det_key.onnx",
        torch.zeros(1, 3, S, S),
        output_names=names,
        dynamic_batch=False,
    )


# ----------------------------------------------------------------------------------------------- images


@dataclass
class Face:
    """A face to draw: `identity` (any int: same int, same person), slot "A" or "B", box in pixels."""

    identity: int
    box: tuple[int, int, int, int]
    slot: str = "A"


@dataclass
class RawImage:
    """One file of the synthetic source: size, faces, background ('grey', 'dark', 'mountains', ...)."""

    name: str
    width: int
    height: int
    faces: list[Face] = field(default_factory=list)
    background: str = "grey"
    body: str | None = None  # "red suit" / "black suit" / None: a torso under the first face
    corrupt: bool = False  # not an image at all


def _identity(i: int) -> dict:
    from persongen_jax.data.make_demo import face_pattern

    rng = np.random.default_rng(1000 + i)
    c1, c2 = (tuple(int(v) for v in rng.integers(0, 256, 2)) for _ in range(2))
    return dict(c1=c1, c2=c2, **face_pattern(rng, period=(0.12, 0.4)))


def _draw(spec: RawImage, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    W, H = spec.width, spec.height
    if spec.background == "dark":
        arr = np.zeros((H, W, 3), np.uint8) + 8
    elif spec.background == "mountains":
        arr = np.zeros((H, W, 3), np.uint8)
        arr[..., 0] = np.linspace(60, 120, H, dtype=np.uint8)[:, None]
        arr[..., 1] = np.linspace(90, 130, H, dtype=np.uint8)[:, None]
        arr[..., 2] = BG_MAX
    else:
        arr = rng.integers(70, BG_MAX, (H, W, 3)).astype(np.uint8)
        arr[:] = arr.reshape(-1, 3).mean(0).astype(np.uint8)  # one flat colour per image
    im = Image.fromarray(arr)
    draw = ImageDraw.Draw(im)
    if spec.body and spec.faces:
        x0, y0, x1, y1 = spec.faces[0].box
        fw, cx = x1 - x0, (x0 + x1) / 2
        colour = (200, 30, 30) if "red" in spec.body else (25, 25, 25)
        draw.polygon([(cx - fw * 0.4, y1), (cx + fw * 0.4, y1), (cx + fw * 1.1, H), (cx - fw * 1.1, H)], fill=colour)
    arr = np.asarray(im).copy()
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    for face in spec.faces:
        p = _identity(face.identity)
        x0, y0, x1, y1 = face.box
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        u, v = (xx - cx) / rx, (yy - cy) / ry
        inside = np.abs(u).clip(0, 1) ** 4 + np.abs(v).clip(0, 1) ** 4 <= 1.0  # rounded square: fills its box
        inside &= (np.abs(u) <= 1) & (np.abs(v) <= 1)
        phase = (np.cos(p["angle"]) * u + np.sin(p["angle"]) * v) / p["period"]
        stripes = np.floor(phase) % 2 == 0
        for ex in (-p["eye_dx"], p["eye_dx"]):  # eyes: discs in the second colour, inverted
            stripes ^= ((u - 2 * ex) ** 2 + ((v - 2 * p["eye_y"]) ** 2)) <= 0.03
        key, free = (1, 2) if face.slot == "A" else (2, 1)
        for mask, (a, c) in ((inside & stripes, p["c1"]), (inside & ~stripes, p["c2"])):
            arr[mask, 0] = a
            arr[mask, free] = c * KEY_LO // 255
            arr[mask, key] = KEY_HI
    return Image.fromarray(arr)


def make_raw_persons(dst: str | Path, persons: dict[str, list[RawImage]], seed: int = 0) -> Path:
    """Writes dst/persons/<id>/<name> for {person id: [RawImage]} (JPEG quality 95, 4:4:4, or PNG by
    extension); returns dst."""
    dst = Path(dst)
    for pid, images in persons.items():
        folder = dst / "persons" / pid
        folder.mkdir(parents=True, exist_ok=True)
        for k, spec in enumerate(images):
            path = folder / spec.name
            if spec.corrupt:
                path.write_bytes(b"this is not an image file")
                continue
            im = _draw(spec, zlib.crc32(f"{seed}/{pid}/{spec.name}".encode()))
            if path.suffix.lower() in (".jpg", ".jpeg"):
                im.save(path, quality=95, subsampling=0)
            else:
                im.save(path)
    return dst


def portrait(
    name: str,
    identity: int,
    *,
    width: int = 640,
    height: int = 720,
    face: int = 300,
    seed: int = 0,
    background: str = "grey",
    body: str | None = "red suit",
) -> RawImage:
    """An image with one slot-A face of side `face` at a seeded position."""
    rng = np.random.default_rng(seed)
    x0 = int(rng.integers(0, width - face))
    y0 = int(rng.integers(0, max(1, height - face - face // 3)))
    return RawImage(name, width, height, [Face(identity, (x0, y0, x0 + face, y0 + face))], background, body)


def synthetic_persons(
    num_persons: int, images_per_person: int, *, seed: int = 0, width: int = 640, height: int = 720, face: int = 300
) -> dict[str, list[RawImage]]:
    """A clean source: every image passes every stage (benchmarks, memory runs)."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in range(num_persons):
        out[f"p{p:05d}"] = [
            portrait(
                f"{k}.jpg",
                p,
                width=width,
                height=height,
                face=face,
                seed=int(rng.integers(1 << 30)),
                body=("red suit", "black suit", None)[k % 3],
            )
            for k in range(images_per_person)
        ]
    return out


def mixed_persons() -> dict[str, list[RawImage]]:
    """A source with one case of each kind a build must handle (tests/test_build.py, scripts/smoke_build.py):
    good portraits of several sizes and backgrounds; an image below 512 px; an undecodable file; a dark image
    (the test endpoint captions it without a class word); a file that is not an image; a face below 256 px;
    an image without a face; a group photo where the person is the smaller, less confident face; a person
    folder with two photos of an intruder; a person with a single image."""
    P = portrait
    return {
        "p0": [
            P("0.jpg", 0, seed=1),
            P("1.jpg", 0, width=800, height=600, face=280, seed=2, background="mountains"),
            P("2.jpg", 0, width=560, height=900, face=320, seed=3, body="black suit"),
            P("3.png", 0, seed=4, background="mountains"),
            P("small.jpg", 0, width=480, height=640, face=300, seed=5),
            RawImage("corrupt.jpg", 0, 0, corrupt=True),
            P("dark.jpg", 0, width=700, height=700, face=270, seed=6, background="dark", body=None),
            RawImage("notes.txt", 0, 0, corrupt=True),
        ],  # not an image extension: not read at all
        "p1": [P(f"{k}.jpg", 1, seed=10 + k, body=("red suit", "black suit")[k % 2]) for k in range(4)]
        + [P("tinyface.jpg", 1, width=640, height=640, face=180, seed=15), RawImage("noface.jpg", 640, 640)],
        "p2": [P(f"{k}.jpg", 2, seed=20 + k) for k in range(3)]
        # the person (slot A, smaller, less confident) next to a stranger (slot B, larger, more confident)
        + [
            RawImage(
                "group.jpg",
                900,
                700,
                [Face(2, (40, 80, 300, 340)), Face(9, (460, 120, 800, 460), "B")],
                body="red suit",
            )
        ],
        "p3": [P(f"{k}.jpg", 3, seed=30 + k) for k in range(4)]
        + [P("intruder_0.jpg", 8, seed=35), P("intruder_1.jpg", 8, seed=36, background="mountains")],
        "p4": [P("0.jpg", 4, seed=40)],
    }


def make_build_inputs(models: str | Path, src: str | Path) -> None:
    """What a build of `mixed_persons` reads: MODELS/det (`make_key_detector`), MODELS/arcface (a random
    BUILD_ARCFACE IResNet) and the source tree SRC."""
    from persongen_jax.testing.tiny_eval import make_tiny_arcface

    make_key_detector(Path(models) / "det")
    make_tiny_arcface(Path(models) / "arcface", **BUILD_ARCFACE)
    make_raw_persons(src, mixed_persons())


# ----------------------------------------------------------------------------------------------- tiny VLM


QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen2.5-VL's chat format, reduced to what the pipeline sends (system/user turns, image + text parts).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_qwen2_5_vl(folder: str | Path, seed: int = 0) -> Path:
    """A random transformers Qwen2.5-VL folder (2-layer vision tower and LM, hidden 32), byte-level
    tokenizer with Qwen's special tokens and chat format, PIL image processor at 56 x 56 pixels.
    Its answers are gibberish: the caption-split parse-failure path."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from persongen_jax.models.presets import _byte_symbols
    from persongen_jax.testing.tiny_eval import TINY_SIZES
    from persongen_jax.testing.torch_init import randomize_

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Qwen2Tokenizer(
        vocab={s: i for i, s in enumerate(_byte_symbols())}, merges=[], chat_template=QWEN_CHAT_TEMPLATE
    )
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[1:])})
    ids = dict(zip(QWEN_SPECIALS, tok.convert_tokens_to_ids(list(QWEN_SPECIALS))))
    special = dict(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|im_start|>"])
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            TINY_SIZES,
            vocab_size=len(tok),
            num_key_value_heads=2,
            max_position_embeddings=1024,
            rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
            **special,
        ),
        # Patches of 14 px merged 2 x 2, windows of 112 px: Qwen2.5-VL's own sizes, the defaults of this config
        # and of the image processor (a 56 x 56 image: 4 x 4 patches, 2 x 2 tokens).
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, fullatt_block_indexes=[1]
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        **special,
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    randomize_(model, seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------- endpoint


def default_caption(image: Image.Image) -> str:
    """The test endpoint's caption: "a dark photo" (no class word) for a mostly dark image, else a man
    in a red suit (red torso under the face) or in a black suit, in the mountains (blue-grey top rows)."""
    a = np.asarray(image.convert("RGB"), np.float32)
    if a.mean() < 50:
        return "a dark photo of something"
    h = a.shape[0]
    body = a[int(h * 0.85) :]
    red = ((body[..., 0] > 150) & (body[..., 1] < 80)).mean() > 0.05
    top = a[: max(1, h // 20)].reshape(-1, 3).mean(0)
    caption = "a photo of a man wearing a " + ("red" if red else "black") + " suit"
    if top[2] > top[0] + 40:
        caption += " in the mountains"
    return caption


def default_split(caption: str) -> dict:
    """The test endpoint's split of a caption into the packaged split prompt's keys: the "in the ..." phrase
    is the background, the "wearing ..." phrase the body."""
    bg = re.search(r"\b(in the \w+|on a \w+ background)", caption)
    body = re.search(r"\bwearing an? \w+ \w+", caption)
    return {"bg": bg.group(0) if bg else "", "body": body.group(0) if body else ""}


class CaptionServer:
    """An OpenAI-compatible `/v1/chat/completions` endpoint on 127.0.0.1 (a thread of this process).

    A request with an image part is answered with `caption(image)`, a text-only request with
    `json.dumps(split(caption))` where the caption is the text after the last "Caption:" line. It records
    every answered request (`requests`: list of {"model", "kind", "text"}) and can delay answers (`delay` s).
    Faults: `die_after` N -- the server dies after N answers (a request arriving meanwhile is dropped
    unanswered, later connections are refused); `trickle` s -- the answer's body is sent one byte every
    `trickle` seconds (a server that never stops answering); `status` -- every chat request is answered
    with this HTTP error status (`posts` counts the chat requests received)."""

    def __init__(
        self,
        caption=default_caption,
        split=default_split,
        *,
        delay: float = 0.0,
        model: str = "tiny-vlm",
        die_after: int | None = None,
        trickle: float = 0.0,
        status: int | None = None,
    ):
        self.caption, self.split, self.delay, self.model = caption, split, delay, model
        self.die_after, self.trickle, self.status, self.posts = die_after, trickle, status, 0
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._reply(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                else:
                    self.send_error(404, f"no route {self.path}")

            def do_POST(self):
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self.send_error(404, f"no route {self.path}")
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.posts += 1
                    dead = server.die_after is not None and len(server.requests) >= server.die_after
                if dead:  # dying: no answer, the connection just closes
                    self.close_connection = True
                    return
                if server.status is not None:
                    self._reply(server.status, {"error": {"message": f"HTTP {server.status}\nfrom the test server"}})
                    return
                if body.get("model") != server.model:
                    self._reply(404, {"error": {"message": f"model {body.get('model')!r} not found"}})
                    return
                parts = body["messages"][-1]["content"]
                parts = parts if isinstance(parts, list) else [{"type": "text", "text": parts}]
                images = [p["image_url"]["url"] for p in parts if p.get("type") == "image_url"]
                text = "\n".join(p["text"] for p in parts if p.get("type") == "text")
                if images:
                    raw = base64.b64decode(images[0].split(",", 1)[1])
                    answer = server.caption(Image.open(io.BytesIO(raw)))
                    kind = "caption"
                else:
                    answer = json.dumps(server.split(text.rsplit("Caption:", 1)[-1].strip()))
                    kind = "split"
                with server.lock:
                    server.requests.append(dict(model=body["model"], kind=kind, text=answer))
                    last = server.die_after is not None and len(server.requests) >= server.die_after
                if last:  # stop listening (a request accepted before that is dropped above)
                    threading.Thread(target=server._die, daemon=True).start()
                time.sleep(server.delay)
                self._reply(
                    200,
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}
                        ],
                    },
                )

            def _reply(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    if not server.trickle:
                        self.wfile.write(data)
                    for i in range(len(data) if server.trickle else 0):
                        self.wfile.write(data[i : i + 1])
                        self.wfile.flush()
                        time.sleep(server.trickle)
                except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: expected here
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _die(self) -> None:
        self.httpd.shutdown()
        self.httpd.socket.close()

    def __enter__(self) -> "CaptionServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, kind: str) -> int:
        with self.lock:
            return sum(r["kind"] == kind for r in self.requests)
