"""The web app (`python -m persongen_jax.app --tiny`) in a real headless Chromium and through gradio_client.

One app process serves the module: tiny random models (the demo training's) at 32x48 with 3 steps, a tiny
random ControlNet for that UNet (--controlnet), the tiny test scoring models (CLIP, SCRFD-layout detector,
ArcFace) passed as --clip / --face-models / --arcface.
The browser is Debian's chromium driven through Debian's chromium-driver (Selenium); nothing
downloads a browser. Screenshots are written under the test's tmp dir (the path is printed, and
recorded as a property in --junitxml reports).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HEIGHT, WIDTH, STEPS, NUM_IMAGES = 32, 48, 3, 2  # the app's defaults here: compiled at start-up
# The keys of the generate CLI's settings.json (persongen_jax/generate.py), which the app's download repeats.
GENERATE_SETTINGS = {
    "model",
    "checkpoint",
    "step",
    "photomaker",
    "lora",
    "adapters",
    "refs",
    "prompt",
    "seeds",
    "height",
    "width",
    "trigger_word",
    "dtype",
    "attention",
    "images",
    "seconds",
    "num_steps",
    "guidance_scale",
    "start_merge_step",
    "negative_prompt",
    "conditions",
    "scheduler",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from persongen_jax.testing.tiny_eval import make_tiny_arcface, make_tiny_clip, make_tiny_detector

    root = tmp_path_factory.mktemp("app")
    make_tiny_clip(root / "clip")
    make_tiny_detector(root / "faces")
    make_tiny_arcface(root / "arcface")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(60, 256, (48, 48, 3)).astype(np.uint8)).save(root / "face.png")
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(root / "black.png")  # the tiny detector: no face
    (root / "notes.png").write_text("not an image")
    Image.fromarray(rng.integers(0, 256, (40, 70, 3)).astype(np.uint8)).save(root / "pose.png")
    # A ControlNet for the demo's tiny UNet, converted in-process (the CLI's subprocess path: test_controlnet).
    from persongen_jax.models import presets
    from persongen_jax.testing.tiny_sdxl import make_tiny_controlnet
    from weights_conversion.__main__ import main as convert

    make_tiny_controlnet(root / "cn_src")
    (root / "unet").mkdir()
    (root / "unet" / "config.json").write_text(
        json.dumps({"_class_name": "UNet2DConditionModel", **presets.get("tiny").unet})
    )
    assert convert(["controlnet", str(root / "cn_src"), str(root / "cn"), "--unet", str(root / "unet")]) == 0
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    cmd = [
        sys.executable,
        "-m",
        "persongen_jax.app",
        "--tiny",
        "--steps",
        str(STEPS),
        "--start-merge-step",
        "1",
        "--num-images",
        str(NUM_IMAGES),
        "--height",
        str(HEIGHT),
        "--width",
        str(WIDTH),
        "--clip",
        str(root / "clip"),
        "--face-models",
        str(root / "faces"),
        "--arcface",
        str(root / "arcface"),
        "--controlnet",
        str(root / "cn"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = dict(os.environ, GRADIO_TEMP_DIR=str(root / "gradio"), GRADIO_ANALYTICS_ENABLED="False")
    log_path = root / "app.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited ({proc.returncode}) before serving:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer on {url} in 300 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "root": root, "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path, prefix='chromium-')}",
        "--window-size=1280,1000",
    ):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)


@pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver): "
    "apt-get install -y chromium chromium-driver (.ci/run does)",
)
def test_browser_generate_scores_and_prompt_error(app, tmp_path, record_property):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser(tmp_path)
    try:
        wait = WebDriverWait(driver, 60)

        def screenshot(name: str, junit_property: str | None = None) -> None:
            shot = tmp_path / f"{name}.png"
            driver.save_screenshot(str(shot))
            print(f"screenshot: {shot}")
            if junit_property:
                record_property(junit_property, str(shot))  # in --junitxml reports

        def generate_shows_error(message: str) -> None:
            """Generate is clicked and the page shows MESSAGE in a toast."""
            driver.find_element(By.CSS_SELECTOR, "#generate").click()
            wait.until(
                lambda d: any(message in e.text for e in d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-text]"))
            )

        driver.get(app["url"])
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#generate"))
        # One field per text condition of the model: the demo model has a bg adapter and no body adapter.
        assert driver.find_elements(By.CSS_SELECTOR, "#cond_bg") and not driver.find_elements(
            By.CSS_SELECTOR, "#cond_body"
        )
        assert "P_bg" in driver.find_element(By.CSS_SELECTOR, "#cond_bg").text

        driver.find_element(By.CSS_SELECTOR, "#refs input[type=file]").send_keys(str(app["root"] / "face.png"))
        wait.until(
            lambda d: (
                "face" in d.find_element(By.CSS_SELECTOR, "#refs").text
                and "KB" in d.find_element(By.CSS_SELECTOR, "#refs").text
            )
        )  # listed once uploaded
        prompt = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
        prompt.clear()
        prompt.send_keys("a photo of a man img wearing a red hat")
        driver.find_element(By.CSS_SELECTOR, "#cond_bg textarea").send_keys("in the mountains")
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(
            lambda d: (
                len(d.find_elements(By.CSS_SELECTOR, "#gallery .gallery-item img")) == NUM_IMAGES
                and "CLIP-T" in d.find_element(By.CSS_SELECTOR, "#gallery").text
                and "image(s)" in d.find_element(By.CSS_SELECTOR, "#status").text
            )
        )
        captions = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#gallery .caption-label")]
        assert len(captions) == NUM_IMAGES, captions
        table = driver.find_element(By.CSS_SELECTOR, "#scores").text
        assert "Face-Sim" in table and "CLIP-T" in table
        for k, caption in enumerate(captions):  # seed, CLIP-T, then Face-Sim (a number or "no face")
            seed, clip_t, face = caption.split(" · ")
            assert seed == f"seed {k}" and clip_t.startswith("CLIP-T "), caption
            assert face == "no face" or face.startswith("Face-Sim "), caption
            # the table holds the same CLIP-T (2 decimals; the caption 1: both rounded, at most 0.055 apart)
            values = [float(x) for x in re.findall(r"-?\d+\.\d\d\b", table)]
            assert any(abs(v - float(clip_t.split()[1])) <= 0.055 for v in values), (caption, table)
        status = driver.find_element(By.CSS_SELECTOR, "#status").text
        assert f"{NUM_IMAGES} image(s) of {WIDTH}x{HEIGHT}" in status and "no compilation" in status, status
        assert ".zip" in driver.find_element(By.CSS_SELECTOR, "#download").text
        screenshot("app_generated", "screenshot")

        prompt.clear()
        prompt.send_keys("a photo of a man wearing a red hat")  # no trigger word
        generate_shows_error("trigger word 'img' is missing")
        screenshot("app_prompt_error", "screenshot_error")

        # Spatial control + style + aspect: a control image uploaded, a style and a 16:9 preset chosen; the
        # images come back at the preset scaled to the tiny model (32 x 16 on its grid of 4).
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.keys import Keys

        def pick_first_option(d):
            """Clicks the first option of an open dropdown; False (retry) while it is empty or re-rendered."""
            try:
                items = d.find_elements(By.CSS_SELECTOR, "li.item")
                if items:
                    items[0].click()
                return bool(items)
            except StaleElementReferenceException:  # the list re-rendered between find and click
                return False

        prompt.clear()
        prompt.send_keys("a photo of a man img wearing a red hat")
        upload = driver.find_element(By.CSS_SELECTOR, "#control_image input[type=file]")
        upload.send_keys(str(app["root"] / "pose.png"))
        wait.until(lambda d: "pose" in d.find_element(By.CSS_SELECTOR, "#control_image").text)
        for elem, text in (("#style", "Cinematic"), ("#aspect", "Widescreen TV / Landscape (16:9)")):
            box = driver.find_element(By.CSS_SELECTOR, f"{elem} input")
            box.click()
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(text)
            wait.until(pick_first_option)  # the filtered options (re-rendered while typing: retried)
            wait.until(
                lambda d, e=elem, t=text: d.find_element(By.CSS_SELECTOR, f"{e} input").get_attribute("value") == t
            )
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: f"{NUM_IMAGES} image(s) of 32x16" in d.find_element(By.CSS_SELECTOR, "#status").text)
        sizes = driver.execute_script(
            "return Array.from(document.querySelectorAll('#gallery .gallery-item img'))"
            ".map(i => [i.naturalWidth, i.naturalHeight])"
        )
        assert sizes == [[32, 16]] * NUM_IMAGES, sizes

        # A control image that cannot be decoded: a message in the page.
        driver.find_element(By.CSS_SELECTOR, "#control_image button[aria-label='Clear']").click()
        upload = driver.find_element(By.CSS_SELECTOR, "#control_image input[type=file]")
        upload.send_keys(str(app["root"] / "notes.png"))
        wait.until(lambda d: "notes" in d.find_element(By.CSS_SELECTOR, "#control_image").text)
        generate_shows_error("control image 'notes.png' is not a readable image")
        screenshot("app_control")
    finally:
        driver.quit()


def test_api_images_of_requested_size_scores_zip_and_errors(app, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(app["url"], verbose=False, download_files=str(tmp_path / "downloads"))
    face = handle_file(str(app["root"] / "face.png"))
    # control_image: the app runs with a ControlNet, so the endpoint has the parameter (None: no control).
    job = client.submit(
        reference_photos=[face],
        prompt="a portrait of a woman img smiling",
        p_bg="in the city",
        num_images=NUM_IMAGES,
        seed=5,
        height=HEIGHT,
        width=WIDTH,
        control_image=None,
        api_name="/generate",
    )
    progress = []
    while not job.done():  # gr.Progress over the denoising steps reaches the client
        st = job.status()
        progress += [(p.desc, p.index, p.length) for p in (st.progress_data or [])]
        time.sleep(0.005)
    gallery, status, scores, zip_path, seed = job.result()
    assert progress and all(desc == "denoising" and length == STEPS for desc, _, length in progress), progress

    assert len(gallery) == NUM_IMAGES and seed == 5
    for k, item in enumerate(gallery):
        with Image.open(item["image"]) as im:
            assert im.size == (WIDTH, HEIGHT) and im.mode == "RGB"
        assert item["caption"].startswith(f"seed {5 + k} · ")
    assert "no compilation" in status, status  # the request shape compiled at start-up: nothing new
    assert scores["headers"] == ["image", "seed", "CLIP-T", "Face-Sim"] and len(scores["data"]) == NUM_IMAGES

    # The download: what the generate CLI writes (seed_<s>.png + settings.json), plus the references.
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
        settings = json.loads(zf.read("settings.json"))
        with Image.open(zf.open("seed_6.png")) as im:
            assert im.size == (WIDTH, HEIGHT)
    assert names == {"seed_5.png", "seed_6.png", "ref_0.png", "settings.json"}
    assert GENERATE_SETTINGS <= set(settings), GENERATE_SETTINGS - set(settings)
    assert settings["seeds"] == [5, 6] and settings["images"] == ["seed_5.png", "seed_6.png"]
    assert settings["prompt"] == "a portrait of a woman img smiling" and settings["conditions"] == {"bg": "in the city"}
    assert (settings["height"], settings["width"], settings["num_steps"]) == (HEIGHT, WIDTH, STEPS)
    assert settings["refs"] == ["ref_0.png"] and settings["ref_names"] == ["face.png"]
    assert settings["clip_t_text"] == "a portrait of a woman smiling. in the city"  # no trigger word
    assert [s["seed"] for s in settings["scores"]] == [5, 6]
    assert [f"{s['clip_t']:.2f}" for s in settings["scores"]] == [row[2] for row in scores["data"]]
    for s, row in zip(settings["scores"], scores["data"]):  # no face: null in the JSON, "no face" in the page
        assert (s["face_sim"] is None) == (not s["face_found"]) == (row[3] == "no face"), (s, row)

    # A control image (the loaded ControlNet), a style and an aspect preset: images at the preset scaled to the
    # model (32 x 16), the style's template and merged negative prompt and the control image in the download.
    from persongen_jax.pipeline.control import STYLES

    # One styled request, with and without the control image.
    styled = dict(reference_photos=[face], prompt="a portrait of a woman img", negative_prompt="a hat", seed=5)
    styled |= dict(style="Neonpunk", aspect="16:9", api_name="/generate")
    control = handle_file(str(app["root"] / "pose.png"))
    gallery, status, _, zip_path, _ = client.predict(**styled, control_image=control, control_scale=0.7)
    for item in gallery:
        with Image.open(item["image"]) as im:
            assert im.size == (32, 16)
    with zipfile.ZipFile(zip_path) as zf:
        settings = json.loads(zf.read("settings.json"))
        assert "control.png" in zf.namelist()
    assert settings["style_template"] == {"prompt": STYLES["Neonpunk"][0], "negative_prompt": STYLES["Neonpunk"][1]}
    assert settings["styled_negative_prompt"] == STYLES["Neonpunk"][1] + " a hat"
    assert (
        settings["aspect"] == "16:9"
        and settings["control_scales"] == [0.7]
        and (settings["height"], settings["width"]) == (16, 32)
    )
    # The same request without the control image: other pixels (the ControlNet acts).
    plain, *_ = client.predict(**styled, control_image=None)
    assert not np.array_equal(np.asarray(Image.open(plain[0]["image"])), np.asarray(Image.open(gallery[0]["image"])))

    # Bad requests: the message, no traceback.
    cases = [
        (
            dict(reference_photos=[handle_file(str(app["root"] / "black.png"))], prompt="a photo of a man img"),
            "no face found in reference image(s) ['black.png']",
        ),
        (dict(reference_photos=[], prompt="a photo of a man img"), "upload 1-4 reference photos"),
        (
            dict(reference_photos=[handle_file(str(app["root"] / "notes.png"))], prompt="a photo of a man img"),
            "reference photo 'notes.png' is not a readable image",
        ),
        (dict(reference_photos=[face], prompt="a photo of a man"), "the trigger word 'img' is missing"),
        (dict(reference_photos=[face] * 5, prompt="a photo of a man img"), "at most 4"),
        (
            dict(reference_photos=[face], prompt="a photo of a man img", height=34),  # tiny: VAE x2, 2 UNet levels
            "height 34: expected a multiple of 4",
        ),
        (
            dict(
                reference_photos=[face],
                prompt="a photo of a man img",
                control_image=handle_file(str(app["root"] / "notes.png")),
            ),
            "control image 'notes.png' is not a readable image",
        ),
        (
            dict(reference_photos=[face], prompt="a photo of a man img", style="Vaporwave"),  # Gradio's own check
            "Value: Vaporwave is not in the list of choices: ['(No style)', 'Cinematic'",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(AppError) as err:
            client.predict(**{"control_image": None, **kwargs}, api_name="/generate")
        assert message in str(err.value), (message, str(err.value))
        assert "Traceback" not in str(err.value)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_uploaded_references_are_downscaled_first(tmp_path, fmt):
    """A reference upload larger than MAX_REF_SIDE is read at most MAX_REF_SIDE px on its long side (the
    aspect ratio kept); a small one is read as it is."""
    from persongen_jax.app import MAX_REF_SIDE, read_reference

    big = tmp_path / f"big.{fmt.lower()}"
    Image.new("RGB", (3 * MAX_REF_SIDE, 3 * MAX_REF_SIDE // 2), (200, 120, 90)).save(big, format=fmt)
    name, im = read_reference(big)
    assert name == big.name and im.size == (MAX_REF_SIDE, MAX_REF_SIDE // 2), im.size
    assert np.abs(np.asarray(im.convert("RGB"), np.int16) - (200, 120, 90)).max() <= 3
    small = tmp_path / f"small.{fmt.lower()}"
    Image.new("RGB", (40, 30), (10, 20, 30)).save(small, format=fmt)
    assert read_reference(small)[1].size == (40, 30)


def test_16_bit_greyscale_uploads_keep_their_brightness(tmp_path):
    """A 16-bit greyscale PNG upload is scaled to 8 bits (>> 8), not clipped to white by PIL's convert."""
    from persongen_jax.app import read_reference

    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 19).astype(np.uint16)  # 0..58349
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp, mode="I;16").save(path)
    _, im = read_reference(path)
    got = np.asarray(im.convert("RGB"), np.float64)
    assert abs(got.mean() - (ramp >> 8).mean()) <= 1, (got.mean(), (ramp >> 8).mean())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tiny", "--photomaker", "pm"], "--tiny brings its own model"),
        (["--tiny", "--clip", "clip"], "scoring options missing: face_sim needs face_detector"),
        (["--tiny", "--metrics", "kid"], "unknown metric 'kid'"),
        (["--tiny", "--metrics", "clip_t,fid"], "--metrics fid: scored over a whole set of images"),
        (["--tiny", "--step", "3"], "--step goes with --checkpoint"),
        (["--model", "no/such/folder"], "no/such/folder: no such model folder"),
    ],
)
def test_cli_errors(argv, message, capsys):
    from persongen_jax.app import main

    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Traceback" not in err, err
