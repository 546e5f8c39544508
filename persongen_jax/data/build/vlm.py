"""Vision-language model backends for the caption and caption-split stages.

    backend = load_backend(spec)                 # spec: settings.ModelSpec
    backend.describe([jpeg_bytes, ...], prompt)  # image + prompt -> text, per image
    backend.complete([prompt, ...])              # text -> text (the caption split)

- `openai`: any OpenAI-compatible chat-completions endpoint with image input (`POST {endpoint}/chat/completions`,
  the image as a base64 data URL): how vLLM / SGLang / TGI servers are run at scale. Requests of a
  batch are in flight together (`concurrency`), so a server's continuous batching sees many at once.
  Temperature 0; connection errors, timeouts, HTTP 429 and 5xx are retried with exponential backoff
  (`retries`); an API key is read from $OPENAI_API_KEY when set. `timeout_s` bounds each request as a
  whole (connect to last byte), and an answer is read up to MAX_ANSWER_BYTES. A request that still fails
  is the endpoint's failure, not the image's (an `EndpointError`: the build stops and says so, DST stays
  as it was); after it this backend sends no more requests. Only an answer over the size limit
  (`AnswerTooLong`) is the image's outcome.
- `transformers`: a local Hugging Face folder of the Qwen2-VL family (Qwen2.5-VL by default; Qwen2-VL
  and the same layout work), never downloaded. Batched greedy generation, left padding, on CUDA in
  bfloat16 when a GPU is there, else CPU float32. The inputs are built as the model's processor builds
  them (chat template; each `<|image_pad|>` repeated grid_t x grid_h x grid_w / merge_size^2 times)
  from the tokenizer and the image processor: that path does not need torchvision, which transformers'
  Qwen processor class requires even for images. A model error stops the run (it is not the image's fault).

One loaded model per folder and process: the caption and split stages share it.
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json
import os
import socket
import threading
import time
import urllib.parse
from pathlib import Path

QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")


class VLMError(RuntimeError):
    """A request that gave no usable answer."""


class EndpointError(VLMError):
    """The endpoint failed, not the image: connection refused or reset, the `timeout_s` deadline, HTTP 429 /
    5xx after the retries, any other HTTP error, an answer that is not a chat completion. An error of the
    run (the build stops, DST stays as it was): `sent` is False for a request not sent because the
    endpoint had already failed."""

    def __init__(self, message: str, endpoint: str, sent: bool = True):  # message: why, without the URL
        super().__init__(message)
        self.endpoint, self.sent = endpoint, sent


class AnswerTooLong(VLMError):
    """An answer over MAX_ANSWER_BYTES: the model did not stop for this input (a property of the image or
    caption, rejected per image), not read further."""


# A chat completion of `max_tokens` (256 by default) is a few KiB; a server that ignores the limit could
# otherwise send any amount, all of it held in memory and stored as a caption.
MAX_ANSWER_BYTES = 64 << 10


def http_request(method: str, url: str, body: bytes | None, headers: dict, timeout_s: float,
                 limit: int) -> tuple[int, bytes]:
    """One HTTP(S) request whose whole duration (connect, send, status, headers, body) is bounded by
    `timeout_s`: a socket timeout bounds each read only, so a server sending one byte per second would keep
    the request alive for ever; a timer shuts the socket down at the deadline instead. Reads at most
    `limit` + 1 bytes of the body (more means over the limit). Connects straight to the host (no proxy).
    -> (HTTP status, body bytes); TimeoutError at the deadline, OSError / http.client.HTTPException else."""
    u = urllib.parse.urlsplit(url)
    conn_class = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    conn = conn_class(u.hostname, u.port, timeout=timeout_s)
    expired, sockets = threading.Event(), []

    def expire():
        expired.set()
        for sock in sockets:  # the connected socket (http.client drops conn.sock once the response owns it)
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the read blocked on it
            except OSError:
                pass

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    try:
        conn.connect()
        sockets.append(conn.sock)
        if expired.is_set():
            raise TimeoutError
        conn.request(method, (u.path or "/") + (f"?{u.query}" if u.query else ""), body=body, headers=headers)
        response = conn.getresponse()
        data = response.read(limit + 1)
        if expired.is_set():  # a body cut short by the shutdown may read as complete
            raise TimeoutError
        return response.status, data
    except (OSError, http.client.HTTPException):
        if expired.is_set():
            raise TimeoutError(f"no complete answer within the {timeout_s:g} s timeout") from None
        raise
    finally:
        timer.cancel()
        conn.close()


class OpenAIChat:
    """The `openai` backend: an OpenAI-compatible chat-completions endpoint (see the module doc)."""
    def __init__(self, spec):
        self.spec = spec
        self.url = spec.endpoint.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            self.headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        self.failed = ""  # the first request that failed for good: later ones are not sent

    def check(self) -> None:
        """ValueError (one line) when the endpoint cannot be reached or does not serve the model; a server
        without the `/models` listing is taken on trust."""
        url = self.spec.endpoint.rstrip("/") + "/models"
        try:
            status, data = http_request("GET", url, None, self.headers, 30.0, 1 << 20)
            if status != 200:
                return  # no model listing on this server
            served = [m.get("id") for m in json.loads(data).get("data", [])]
        except (OSError, http.client.HTTPException) as e:
            raise ValueError(f"{self.spec.endpoint}: cannot reach the endpoint ({type(e).__name__}: {e})") from None
        except (ValueError, AttributeError):
            return  # not an OpenAI-style listing: let the requests tell
        if served and self.spec.model not in served:
            raise ValueError(f"{self.spec.endpoint}: does not serve model {self.spec.model!r} (it serves {served})")

    def _fail(self, message: str) -> EndpointError:
        self.failed = self.failed or message
        return EndpointError(message, self.spec.endpoint)

    def _post(self, content) -> str:
        if self.failed:  # the endpoint is down: the run stops anyway, asking again only costs the retries
            raise EndpointError(f"not sent (an earlier request failed: {self.failed})"[:400],
                                self.spec.endpoint, sent=False)
        body = json.dumps(dict(model=self.spec.model, messages=[{"role": "user", "content": content}],
                               max_tokens=self.spec.max_new_tokens, temperature=0.0)).encode()
        delay = 1.0
        for attempt in range(self.spec.retries + 1):
            try:
                status, data = http_request("POST", self.url, body, self.headers, self.spec.timeout_s,
                                            MAX_ANSWER_BYTES)
            except (OSError, http.client.HTTPException) as e:  # refused, reset, the deadline (TimeoutError)
                error = f"{type(e).__name__}: {e}"
            else:
                if 200 <= status < 300:
                    if len(data) > MAX_ANSWER_BYTES:
                        raise AnswerTooLong(f"the answer is over the {MAX_ANSWER_BYTES}-byte limit")
                    try:
                        return json.loads(data)["choices"][0]["message"]["content"] or ""
                    except (ValueError, KeyError, IndexError, TypeError) as e:
                        raise self._fail(f"not a chat-completions answer ({type(e).__name__}: {e})"[:400]) from None
                error = f"HTTP {status} {data[:300].decode(errors='replace')}"
                if status != 429 and status < 500:  # the request itself is refused: asking again cannot help
                    raise self._fail(error)
            if attempt < self.spec.retries:
                time.sleep(delay)
                delay *= 2
        raise self._fail(f"{error} (after {self.spec.retries + 1} attempts)")

    def _map(self, fn, items) -> list:
        def safe(x):
            try:
                return fn(x)
            except VLMError as e:
                return e

        with concurrent.futures.ThreadPoolExecutor(max_workers=self.spec.concurrency) as pool:
            return list(pool.map(safe, items))

    def describe(self, jpegs: list[bytes], prompt: str) -> list:
        """JPEG crops + prompt -> one answer per image (a VLMError in place of a failed request)."""
        def one(jpeg):
            url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
            return self._post([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}])
        return self._map(one, jpegs)

    def complete(self, prompts: list[str]) -> list:
        """Text prompts -> one answer each (a VLMError in place of a failed request)."""
        return self._map(lambda p: self._post([{"type": "text", "text": p}]), prompts)


class TransformersVLM:
    """The `transformers` backend: a local Qwen2-VL-family folder, batched greedy generation (see the module doc)."""
    def __init__(self, spec):
        self.spec = spec
        self.tokenizer, self.image_processor, self.model, self.lock = _load_qwen_vl(spec.model)
        self.device = self.model.device
        self.image_token = "<|image_pad|>"

    def _generate(self, texts: list[str], images=None) -> list[str]:
        import torch

        extra = {}
        if images is not None:
            pix = self.image_processor(images=images, return_tensors="pt")
            merge = self.image_processor.merge_size ** 2
            counts = (pix["image_grid_thw"].prod(-1) // merge).tolist()
            texts = [t.replace(self.image_token, self.image_token * int(n), 1) for t, n in zip(texts, counts)]
            extra = {k: v.to(self.device) for k, v in pix.items()}
            extra["pixel_values"] = extra["pixel_values"].to(self.model.dtype)
        enc = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
        with self.lock, torch.inference_mode():
            out = self.model.generate(**enc, **extra, max_new_tokens=self.spec.max_new_tokens, do_sample=False)
        return [t.strip() for t in self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                                skip_special_tokens=True)]

    def _chat(self, content) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    def describe(self, jpegs: list[bytes], prompt: str) -> list:
        """JPEG crops + prompt -> one answer per image, in batches of `batch_size`."""
        from PIL import Image

        images = [Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs]
        text = self._chat([{"type": "image"}, {"type": "text", "text": prompt}])
        out = []
        for i in range(0, len(images), self.spec.batch_size):
            chunk = images[i:i + self.spec.batch_size]
            out += self._generate([text] * len(chunk), chunk)
        return out

    def complete(self, prompts: list[str]) -> list:
        """Text prompts -> one answer each, in batches of `batch_size`."""
        out = []
        for i in range(0, len(prompts), self.spec.batch_size):
            out += self._generate([self._chat([{"type": "text", "text": p}]) for p in prompts[i:i + self.spec.batch_size]])
        return out


_LOCK = threading.Lock()
_MODELS: dict = {}


def _load_qwen_vl(folder: str):
    """(tokenizer, image processor, model, lock) of a local Qwen2-VL-family folder, once per process."""
    with _LOCK:
        if folder not in _MODELS:
            import torch
            from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

            path = Path(folder)
            _check_qwen_folder(folder)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            tokenizer.padding_side = "left"
            if tokenizer.chat_template is None:  # newer folders keep it beside the processor
                for name in ("chat_template.json", "chat_template.jinja"):
                    if (path / name).is_file():
                        text = (path / name).read_text()
                        tokenizer.chat_template = json.loads(text)["chat_template"] if name.endswith("json") else text
                        break
            image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(
                path, local_files_only=True, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
            _MODELS[folder] = (tokenizer, image_processor, model.to(device).eval(), threading.Lock())
        return _MODELS[folder]


def _check_qwen_folder(folder: str) -> None:
    try:
        model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: cannot read config.json ({type(e).__name__})") from None
    if model_type not in QWEN_VL_TYPES:
        raise ValueError(f"{folder}: model type {model_type!r}; the transformers backend runs the Qwen2-VL family "
                         f"{list(QWEN_VL_TYPES)} (serve other VLMs with vLLM and use the openai backend)")


def check_backend(spec) -> None:
    """Cheap checks before a run (ValueError, one line): the endpoint answers and serves the model; a local
    folder holds a Qwen2-VL-family config."""
    if spec.backend == "openai":
        OpenAIChat(spec).check()
    else:
        _check_qwen_folder(spec.model)


def load_backend(spec):
    """The backend for `spec` (a transformers model folder is loaded once per process, however many
    stages use it)."""
    return OpenAIChat(spec) if spec.backend == "openai" else TransformersVLM(spec)
