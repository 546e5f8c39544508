"""Euler-discrete and DDIM schedulers vs diffusers' on the SDXL scheduler config."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from persongen_jax.pipeline import schedulers as S  # noqa: E402
from persongen_jax.testing.tiny_sdxl import SCHEDULER  # noqa: E402

STEPS = 10
SHAPE = (2, 4, 8, 8)


def _pair(kind: str, **overrides):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    cfg = dict(SCHEDULER, **overrides)
    ref = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}[kind].from_config(cfg)
    return ref, S.scheduler_from_config(cfg, kind)


def _model(x, noise):
    """A stand-in denoiser: mostly the (scaled) input, so the trajectory stays O(1) as with a real
    model, plus a fixed random part per step; the same function runs on both sides."""
    return 0.9 * x + 0.1 * noise


def _reference_trajectory(ref, x0, noise):
    import torch

    ref.set_timesteps(STEPS)
    x = torch.from_numpy(x0) * ref.init_noise_sigma
    out = []
    for i, t in enumerate(ref.timesteps):
        eps = _model(ref.scale_model_input(x, t), torch.from_numpy(noise[i]))
        x = ref.step(eps, t, x).prev_sample
        out.append(x.numpy())
    return np.stack(out)


@pytest.mark.parametrize("kind", ["euler", "ddim"])
@pytest.mark.parametrize(
    "spacing,prediction", [("leading", "epsilon"), ("trailing", "epsilon"), ("linspace", "v_prediction")]
)
def test_trajectory_matches_diffusers(kind, spacing, prediction):
    ref, sched = _pair(kind, timestep_spacing=spacing, prediction_type=prediction)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal((STEPS, *SHAPE)).astype(np.float32)
    expected = _reference_trajectory(ref, x0, noise)

    state = sched.set_timesteps(STEPS)
    np.testing.assert_array_equal(np.asarray(state.timesteps), ref.timesteps.numpy())
    assert np.asarray(state.timesteps).dtype == (np.float32 if kind == "euler" else np.int32)
    assert state.num_inference_steps == STEPS
    np.testing.assert_allclose(float(sched.init_noise_sigma(state)), float(ref.init_noise_sigma), rtol=1e-6)
    if kind == "euler":
        np.testing.assert_allclose(np.asarray(state.sigmas), ref.sigmas.numpy(), rtol=1e-6, atol=0)

    # Step by step (eager, Python int index) ...
    x = jnp.asarray(x0) * sched.init_noise_sigma(state)
    for i in range(STEPS):
        x = sched.step(state, _model(sched.scale_model_input(state, x, i), jnp.asarray(noise[i])), i, x)
        np.testing.assert_allclose(np.asarray(x), expected[i], rtol=1e-5, atol=1e-5, err_msg=f"step {i}")

    # ... and the whole loop as one jitted fori_loop with a traced index.
    @jax.jit
    def sample(state, x0, noise):
        def body(i, x):
            return sched.step(state, _model(sched.scale_model_input(state, x, i), noise[i]), i, x)

        return jax.lax.fori_loop(0, state.num_inference_steps, body, x0 * sched.init_noise_sigma(state))

    final = sample(state, jnp.asarray(x0), jnp.asarray(noise))
    np.testing.assert_allclose(np.asarray(final), expected[-1], rtol=1e-5, atol=1e-5)


def test_sdxl_schedule_values():
    """SDXL base, 50 steps: leading spacing with offset 1 -> 981, 961, ..., 1."""
    sched = S.scheduler_from_config(dict(SCHEDULER, _class_name="EulerDiscreteScheduler"))
    assert isinstance(sched, S.EulerDiscreteScheduler)
    state = sched.set_timesteps(50)
    np.testing.assert_array_equal(np.asarray(state.timesteps), np.arange(981, 0, -20, dtype=np.float32))
    assert float(state.sigmas[-1]) == 0.0 and state.sigmas.shape == (51,)
    ddim = S.scheduler_from_config(SCHEDULER, "ddim").set_timesteps(50)
    np.testing.assert_array_equal(np.asarray(ddim.timesteps), np.arange(981, 0, -20))


def test_add_noise_matches_diffusers():
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    t = np.array([0, 999], dtype=np.int64)
    sched = S.scheduler_from_config(SCHEDULER, "ddim")
    ours = jax.jit(sched.add_noise)(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    for cls in (DDPMScheduler, DDIMScheduler):
        ref = cls.from_config(SCHEDULER).add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
        np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-6, atol=1e-6, err_msg=cls.__name__)
    ref_v = DDPMScheduler.from_config(SCHEDULER).get_velocity(
        torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    )
    np.testing.assert_allclose(
        np.asarray(sched.get_velocity(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))),
        ref_v.numpy(),
        rtol=1e-6,
        atol=1e-6,
    )
    # Euler's sigma form (img2img) at a schedule index.
    euler, ref = S.scheduler_from_config(SCHEDULER, "euler"), EulerDiscreteScheduler.from_config(SCHEDULER)
    state = euler.set_timesteps(STEPS)
    ref.set_timesteps(STEPS)
    ref_e = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref.timesteps[3:4].repeat(2))
    np.testing.assert_allclose(
        np.asarray(euler.add_noise_at_index(state, jnp.asarray(x0), jnp.asarray(noise), 3)),
        ref_e.numpy(),
        rtol=1e-6,
        atol=1e-6,
    )


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        S.EulerDiscreteScheduler.from_config(dict(SCHEDULER, use_karras_sigmas=True))
    with pytest.raises(ValueError, match="thresholding"):
        S.DDIMScheduler.from_config(dict(SCHEDULER, thresholding=True))
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        S.DDIMScheduler.from_config(dict(SCHEDULER, rescale_betas_zero_snr=True))
    with pytest.raises(ValueError, match="'frobnicate'"):
        S.DDIMScheduler.from_config(dict(SCHEDULER, frobnicate=1))
    with pytest.raises(ValueError, match="timestep_spacing='sometimes'"):
        S.EulerDiscreteScheduler.from_config(dict(SCHEDULER, timestep_spacing="sometimes"))
    with pytest.raises(ValueError, match="unsupported scheduler 'PNDMScheduler'"):
        S.scheduler_from_config(dict(SCHEDULER, _class_name="PNDMScheduler"))
    # Settings only the other class uses are ignored, as diffusers does (SDXL builds DDIM from Euler's config).
    assert S.DDIMScheduler.from_config(dict(SCHEDULER, use_karras_sigmas=True)).set_alpha_to_one is False
    # from_pretrained: the scheduler folder or the pipeline folder above it.
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(dict(SCHEDULER, _class_name="EulerDiscreteScheduler"))
    )
    assert isinstance(S.scheduler_from_pretrained(tmp_path), S.EulerDiscreteScheduler)
    assert isinstance(S.DDIMScheduler.from_pretrained(tmp_path / "scheduler"), S.DDIMScheduler)
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        S.scheduler_from_pretrained(tmp_path / "scheduler" / "nope")


def test_damaged_config_files_are_one_error_naming_the_file(tmp_path):
    """Every JSON config reader goes through persongen_jax.io.read_json: a damaged scheduler config, component
    config.json or LoRA folder config is a ValueError naming the file, not a JSONDecodeError traceback."""
    from persongen_jax.models import lora, modeling

    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / S.SCHEDULER_CONFIG).write_text('{"_class_name": "EulerDiscreteScheduler",')
    with pytest.raises(ValueError, match=r"scheduler/scheduler_config.json: not valid JSON"):
        S.read_scheduler_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json: expected a JSON object, got list"):
        modeling.read_config(tmp_path)
    with pytest.raises(ValueError, match=r"config.json: expected a JSON object"):
        lora.read_lora_config(tmp_path)
