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
