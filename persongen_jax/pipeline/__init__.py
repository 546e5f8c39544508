"""Sampling: schedulers (pure-functional, loop-friendly) and prompt handling (tokenizers, SDXL encode,
the PhotoMaker trigger word)."""

import math
import numbers

# Seeds are integers in [0, MAX_SEED]: jax.random.key keeps 32 bits, so 2**32 would repeat seed 0's image.
MAX_SEED = 2**32 - 1

# PhotoMaker v1 / the research: the ID embedding joins after step 10 of 50. As a fraction it keeps that
# meaning for any number of steps (PhotoMaker's demo derives the step from a ratio the same way).
DEFAULT_START_MERGE = 0.2


# stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json: what a folder converted without a scheduler
# (and the tiny model size) samples and trains with. Here, beside the other JAX-free defaults, so the
# benchmarks' PyTorch side configures diffusers' scheduler from it without importing JAX.
SDXL_SCHEDULER_CONFIG = dict(
    _class_name="EulerDiscreteScheduler",
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    clip_sample=False,
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
)


def resolve_start_merge_step(start_merge_step: int | float, num_steps: int) -> int:
    """The step index after which the ID embedding (and the gated conditions) enter sampling: an integer
    (>= 0, or an integral float >= 1) is the index itself; a float in [0, 1) is a fraction of `num_steps`,
    `int(fraction * num_steps)` as PhotoMaker's `style_strength_ratio` (0.2 of 50 -> 10, 0.2 of 4 -> 0)."""
    if not isinstance(start_merge_step, numbers.Integral) and start_merge_step < 1:
        return int(math.floor(float(start_merge_step) * num_steps + 1e-9))  # 0.29 * 100 is 28.999...
    return int(start_merge_step)


def id_unused_warning(start_merge_step: int | float, num_steps: int) -> str | None:
    """The warning every CLI prints when the reference faces would never enter sampling (the step index is
    >= num_steps - 1: PhotoMaker's `i <= start_merge_step` keeps the text-only prompt on every step), else None."""
    index = resolve_start_merge_step(start_merge_step, num_steps)
    if index < num_steps - 1:
        return None
    return (
        f"start merge step {start_merge_step!r} (step index {index}) >= steps - 1 = {num_steps - 1}: the "
        f"reference faces (ID embedding) are never used; give a smaller step or a fraction such as "
        f"{DEFAULT_START_MERGE} (step {resolve_start_merge_step(DEFAULT_START_MERGE, num_steps)} of {num_steps})"
    )
