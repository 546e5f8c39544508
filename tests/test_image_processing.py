import numpy as np
import pytest
from PIL import Image

from persongen_jax.pipeline.image_processing import ImageError, clip_preprocess, load_image


@pytest.mark.parametrize("shape", [(300, 257, 3), (224, 224, 3), (100, 180, 3)])
def test_clip_preprocess_matches_transformers(shape):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8))
    ref = CLIPImageProcessorPil()(img, return_tensors="np").pixel_values[0].transpose(1, 2, 0)
    np.testing.assert_allclose(clip_preprocess(img), ref, atol=1e-6)


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "missing.jpg")
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="corrupt.jpg: cannot read image"):
        load_image(bad)
    good = tmp_path / "ok.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="trunc.png"):
        load_image(trunc)
    assert load_image(good).size == (8, 8)


def _transparent_images():
    """PIL images with transparency in each form PNG stores it, and an RGBA array."""
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (37, 29, 4)).astype(np.uint8)
    rgba[:10, :, 3] = 0  # fully transparent rows (their colours are what dropping alpha would show)
    rgba[10:20, :, 3] = 255  # opaque rows
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    palette = Image.fromarray(rgba[..., :3]).quantize(16)
    palette.info["transparency"] = 3  # palette PNG: one index transparent
    keyed = Image.fromarray(np.where(rgba[..., :1] < 128, 0, rgba[..., :3]).astype(np.uint8))
    keyed.info["transparency"] = (0, 0, 0)  # RGB PNG with a colour key
    return [Image.fromarray(rgba, "RGBA"), la, palette, keyed, rgba]


def test_transparency_is_composited_on_white_as_transformers(tmp_path):
    """transformers' CLIP processing composites transparency onto white (image_transforms.convert_to_rgb,
    PIL and numpy paths); we do the same, bitwise, for CLIP-T and for the Face-Sim detector input."""
    from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from persongen_jax.pipeline.image_processing import convert_to_rgb

    proc = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    for im in _transparent_images():
        ours = convert_to_rgb(im)
        np.testing.assert_array_equal(ours, hf_convert_to_rgb(im, return_numpy=True))
        ref = proc(im, return_tensors="np").pixel_values[0].transpose(1, 2, 0)
        np.testing.assert_allclose(clip_preprocess(im, 24), ref, atol=1e-6)
    rgba = _transparent_images()[0]
    assert convert_to_rgb(rgba)[:10].min() == 255  # transparent -> white, not the hidden colours
    path = tmp_path / "cutout.png"
    rgba.save(path)
    np.testing.assert_array_equal(np.asarray(load_image(path, composite_on_white=True)), convert_to_rgb(rgba))
    # Default (generation references, as diffusers' load_image): alpha dropped, colours under it kept.
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(rgba)[..., :3])


def test_clip_image_processor_reads_the_model_folders_config(tmp_path):
    """Non-default resize / crop / mean / std / resample from preprocessor_config.json, and the nested
    entry of processor_config.json winning over it, as transformers' from_pretrained reads them."""
    import json

    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from persongen_jax.pipeline.image_processing import CLIPImageProcessor

    assert CLIPImageProcessor.from_pretrained(tmp_path, 32) == CLIPImageProcessor.at_size(32)  # no file: defaults
    rng = np.random.default_rng(2)
    shapes = [(50, 41, 3), (30, 64, 3), (20, 20, 3)]
    images = [Image.fromarray(rng.integers(0, 256, s).astype(np.uint8)) for s in shapes]
    configs = [
        # OpenAI's legacy form (ints), other crop than size, other statistics and filter.
        {
            "size": 40,
            "crop_size": 32,
            "image_mean": [0.5, 0.4, 0.3],
            "image_std": [0.2, 0.25, 0.3],
            "resample": 2,
            "feature_extractor_type": "CLIPFeatureExtractor",
        },
        # exact resize, a crop larger than it (zero padding), rescale factor and scalar mean / std.
        {
            "size": {"height": 28, "width": 30},
            "crop_size": {"height": 32, "width": 32},
            "rescale_factor": 0.5 / 255,
            "image_mean": 0.5,
            "image_std": 0.5,
        },
        {"do_resize": False, "crop_size": {"height": 24, "width": 24}, "do_normalize": False},
    ]
    for i, cfg in enumerate(configs):
        folder = tmp_path / f"c{i}"
        folder.mkdir()
        (folder / "preprocessor_config.json").write_text(json.dumps(cfg))
        ours = CLIPImageProcessor.from_pretrained(folder, 224)
        ref = CLIPImageProcessorPil.from_pretrained(folder)
        for im in images:
            np.testing.assert_allclose(
                ours(im), ref(im, return_tensors="np").pixel_values[0].transpose(1, 2, 0), atol=1e-6, err_msg=str(cfg)
            )
    # transformers 5 saves a processor as processor_config.json {"image_processor": {...}}: it comes first.
    folder = tmp_path / "c0"
    (folder / "processor_config.json").write_text(
        json.dumps({"image_processor": configs[1], "processor_class": "CLIPProcessor"})
    )
    ours, ref = CLIPImageProcessor.from_pretrained(folder, 224), CLIPImageProcessorPil.from_pretrained(folder)
    assert ours.size == (28, 30) and ours.image_mean == (0.5, 0.5, 0.5)
    np.testing.assert_allclose(
        ours(images[0]), ref(images[0], return_tensors="np").pixel_values[0].transpose(1, 2, 0), atol=1e-6
    )
    (folder / "processor_config.json").write_text(json.dumps({"size": {"longest_edge": 40}}))  # no image_processor
    assert CLIPImageProcessor.from_pretrained(folder, 224).crop_size == (32, 32)
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"longest_edge": 40}}))
    with pytest.raises(ValueError, match=r"preprocessor_config.json: size .*longest_edge"):
        CLIPImageProcessor.from_pretrained(folder, 224)
    (folder / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json: not valid JSON"):
        CLIPImageProcessor.from_pretrained(folder, 224)


def test_16_bit_and_float_greyscale_keep_their_brightness(tmp_path):
    """A 16-bit greyscale PNG (PIL modes I;16 / I;16B, I from a 16-bit PGM, F) decoded
    by every reader of images -- load_image (generate / evaluate / app), convert_to_rgb (the CLIP
    processing), the build's decode_rgb and the training pipeline's decoder -- keeps its mean within 1 of
    the 8-bit reference (PIL's own convert("RGB") clips it to white: mean 255)."""
    from persongen_jax.data.build.decode import decode_rgb
    from persongen_jax.data.pipeline import _decode
    from persongen_jax.pipeline.image_processing import convert_to_rgb

    # A gradient over the whole 16-bit range: its 8-bit version (x >> 8) has mean 117.4.
    grad16 = (np.linspace(0, 60000, 48 * 64).reshape(48, 64)).astype(np.uint16)
    want = (grad16 >> 8).astype(np.float64)
    assert abs(want.mean() - 117) < 1
    png = tmp_path / "grey16.png"
    Image.fromarray(grad16).save(png)
    pgm = tmp_path / "grey16.pgm"  # PIL opens a 16-bit PGM in mode I
    pgm.write_bytes(b"P5 64 48 65535\n" + grad16.astype(">u2").tobytes())
    with Image.open(png) as im, Image.open(pgm) as im_i:
        assert (im.mode, im_i.mode) == ("I;16", "I")
        opened = {"I;16": im.copy(), "I": im_i.copy()}
    opened["I;16B"] = Image.fromarray(grad16.astype(">u2"))
    opened["F"] = Image.fromarray(grad16.astype(np.float32) / 65535)
    assert {m: o.mode for m, o in opened.items()} == {m: m for m in opened}

    def check(rgb, what):
        rgb = np.asarray(rgb, np.float64)
        assert rgb.shape == (48, 64, 3), what
        assert abs(rgb.mean() - want.mean()) < 1, (what, rgb.mean(), want.mean())
        np.testing.assert_allclose(rgb[..., 0], want, atol=1, err_msg=what)

    for path in (png, pgm):
        check(load_image(path), f"load_image {path.name}")
        check(load_image(path, composite_on_white=True), f"load_image composite {path.name}")
        check(decode_rgb(path.read_bytes()), f"decode_rgb {path.name}")
        check(_decode(path.read_bytes()), f"training decoder {path.name}")
    for mode, image in opened.items():
        check(convert_to_rgb(image), f"convert_to_rgb {mode}")
    check(convert_to_rgb(grad16), "convert_to_rgb uint16 array")
    # An 8-bit image is untouched.
    grey8 = (grad16 >> 8).astype(np.uint8)
    np.testing.assert_array_equal(convert_to_rgb(Image.fromarray(grey8))[..., 1], grey8)
