"""FID: the NNX InceptionV3 vs pytorch-fid's InceptionV3 (random weights and BatchNorm statistics), the
streaming statistics vs np.cov, the Fréchet distance vs pytorch-fid's calculate_frechet_distance, the
`weights_conversion inception` command and the reference options (image folder / .npz)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_fid")


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """pytorch-fid's InceptionV3 (random) and its state dict converted by the CLI (the InceptionV3 layout)."""
    from persongen_jax.testing.torch_refs import fid_inception
    from weights_conversion.__main__ import main

    root = tmp_path_factory.mktemp("fid")
    ref = fid_inception(seed=0)
    torch.save(ref.state_dict(), root / "fid_inception.pth")
    assert main(["inception", str(root / "fid_inception.pth"), str(root / "dst")]) == 0
    return root, ref


def test_pool_features_match_pytorch_fid(inception):
    """Resize (up to 299), normalisation and the network within 1e-4 relative, through FIDScorer's padded,
    sharded batches; the resize alone also when shrinking (no antialias, as F.interpolate)."""
    import jax.numpy as jnp

    from persongen_jax.evaluation.fid import FIDScorer
    from persongen_jax.models.inception import resize_bilinear

    root, ref = inception
    scorer = FIDScorer.from_pretrained(root / "dst", batch_size=2)
    images = np.random.default_rng(0).integers(0, 256, (3, 96, 120, 3)).astype(np.uint8)
    with torch.no_grad():
        want = ref(torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255))[0]
    got = scorer.features(list(images))
    assert got.shape == (3, 2048)
    assert _rel(got, want.reshape(3, -1).numpy()) < 1e-4

    big = np.random.default_rng(1).random((1, 3, 420, 333)).astype(np.float32)
    want = (
        torch.nn.functional.interpolate(torch.from_numpy(big), size=(299, 299), mode="bilinear", align_corners=False)
        .numpy()
        .transpose(0, 2, 3, 1)
    )
    np.testing.assert_allclose(resize_bilinear(jnp.asarray(big.transpose(0, 2, 3, 1)), 299), want, atol=1e-6)


def test_streaming_statistics_and_frechet_distance_match_pytorch_fid():
    """FeatureStats merged batch by batch == np.cov / mean of all rows; FID of two feature sets vs
    calculate_frechet_distance within 1e-3, full-rank and rank-deficient (fewer samples than dimensions)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    from persongen_jax.evaluation.fid import FeatureStats, frechet_distance

    rng = np.random.default_rng(1)
    for n, dim in ((900, 64), (40, 64)):
        a = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) * 0.3 + 2.0
        b = rng.standard_normal((n + 7, dim)) * 0.8 + 1.5
        stats_a, stats_b = FeatureStats(dim), FeatureStats(dim)
        for start in range(0, n, 13):  # uneven batches
            stats_a.update(a[start : start + 13])
        stats_b.update(b)
        mu_a, sigma_a = stats_a.mean_cov()
        np.testing.assert_allclose(mu_a, a.mean(0), rtol=0, atol=1e-10)
        np.testing.assert_allclose(sigma_a, np.cov(a, rowvar=False), rtol=0, atol=1e-9)
        mu_b, sigma_b = stats_b.mean_cov()
        want = calculate_frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
        assert abs(frechet_distance(mu_a, sigma_a, mu_b, sigma_b) - want) < 1e-3, (n, dim, want)
    assert frechet_distance(mu_a, sigma_a, mu_a, sigma_a) == pytest.approx(0, abs=1e-4)


def test_fid_reference_folder_npz_and_errors(inception, tmp_path, capsys):
    from persongen_jax.evaluation import metrics
    from persongen_jax.evaluation.fid import FIDScorer
    from weights_conversion.__main__ import main

    root, _ = inception
    scorer = FIDScorer.from_pretrained(root / "dst", batch_size=2)
    rng = np.random.default_rng(2)
    folder = tmp_path / "ref"
    (folder / "sub").mkdir(parents=True)
    arrays = [rng.integers(0, 256, (80, 80 + 8 * (i % 2), 3)).astype(np.uint8) for i in range(3)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / ("sub" if i % 2 else ".") / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    mu, sigma = scorer.reference_statistics(folder)  # two sizes, batched apart, streamed
    feats = scorer.features_of(arrays).astype(np.float64)
    np.testing.assert_allclose(mu, feats.mean(0), atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), atol=1e-6)
    np.savez_compressed(tmp_path / "stats.npz", mu=mu, sigma=sigma)  # pytorch-fid --save-stats layout
    mu2, sigma2 = scorer.reference_statistics(tmp_path / "stats.npz")
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)

    np.savez(tmp_path / "bad.npz", mu=mu)
    with pytest.raises(ValueError, match="bad.npz: FID statistics need arrays 'mu' and 'sigma'"):
        scorer.reference_statistics(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="must be an image folder or a .npz"):
        scorer.reference_statistics(tmp_path / "nothing.npz")
    (tmp_path / "one").mkdir()
    Image.fromarray(arrays[0]).save(tmp_path / "one" / "a.png")
    with pytest.raises(ValueError, match="one: FID reference folder holds 1 image"):
        scorer.reference_statistics(tmp_path / "one")
    from persongen_jax.models import modeling
    from persongen_jax.models.vit import ViTModel

    vit = ViTModel.preset_config("tiny")
    modeling.save_pretrained(modeling.random_init(ViTModel, vit, 0), vit, tmp_path / "vit")
    with pytest.raises(ValueError, match="metric fid: .*vit: FID needs an InceptionV3 folder .* found ViTModel"):
        metrics.build(["fid"], {"inception": tmp_path / "vit", "fid_reference": folder})
    with pytest.raises(ValueError, match="scoring options missing: fid needs inception .*fid needs fid_reference"):
        metrics.build(["fid"], {})
    # Strict conversion: a foreign tensor is named and nothing is written.
    torch.save(
        {"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3), "extra.weight": torch.zeros(2)}, tmp_path / "extra.pth"
    )
    assert main(["inception", str(tmp_path / "extra.pth"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "missing keys (" in err and "unexpected keys (1): extra.weight" in err, err
    assert not (tmp_path / "out").exists()
