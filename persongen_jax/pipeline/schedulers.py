"""Euler-discrete and DDIM schedulers, pure-functional, matching diffusers' numerics.

    sched = EulerDiscreteScheduler.from_pretrained(model_dir / "scheduler")   # or from_config(dict)
    state = sched.set_timesteps(50)                  # host-side, a small pytree of arrays
    latents = noise * sched.init_noise_sigma(state)
    def body(i, latents):                            # i: traced step index
        t = state.timesteps[i]
        eps = unet(sched.scale_model_input(state, latents, i), t, ...)
        return sched.step(state, eps, i, latents)
    latents = jax.lax.fori_loop(0, state.num_inference_steps, body, latents)

The scheduler object holds only the (static, hashable) configuration; everything
that depends on the number of steps lives in the state, and every per-step
function takes the step *index* `i` (a traced int), so the whole loop compiles
once. The tables are computed on the host with numpy in the precision diffusers
uses (float32 betas and cumulative products accumulated in float64 as torch's CPU
`cumprod` does, sigma interpolation in float64, then cast to float32), and the
per-step math is float32 in diffusers' order of operations.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from persongen_jax.io import read_json

SCHEDULER_CONFIG = "scheduler_config.json"

# Settings of diffusers' scheduler configs that the *other* scheduler classes use. diffusers ignores
# them when building a scheduler that does not know them (SDXL pipelines build DDIM from an Euler
# config), so they are ignored here too; any other unknown key is an error.
_FOREIGN_KEYS = frozenset(
    {
        # EulerDiscreteScheduler
        "interpolation_type",
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "sigma_min",
        "sigma_max",
        "timestep_type",
        "final_sigmas_type",
        # DDIMScheduler
        "clip_sample",
        "set_alpha_to_one",
        "thresholding",
        "dynamic_thresholding_ratio",
        "clip_sample_range",
        "sample_max_value",
        # PNDM / DPM-Solver / others commonly found in SD(XL) scheduler configs
        "skip_prk_steps",
        "variance_type",
        "solver_order",
        "algorithm_type",
        "solver_type",
        "lower_order_final",
        "euler_at_final",
        "lambda_min_clipped",
        "use_lu_lambdas",
        "use_flow_sigmas",
        "flow_shift",
    }
)


def _beta_table(
    num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str, trained_betas
) -> np.ndarray:
    """betas [T] float32 as diffusers builds them (torch float32 linspace, then squared)."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float32)
        if betas.shape != (num_train_timesteps,):
            raise ValueError(f"trained_betas: expected {num_train_timesteps} values, got shape {betas.shape}")
        return betas
    if beta_schedule == "linear":
        return _torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        lin = _torch_linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps)
        return lin * lin
    raise ValueError(f"beta_schedule={beta_schedule!r} is not supported (use 'linear' or 'scaled_linear')")


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32)'s formula: float32 step, the first half counted
    up from `start`, the second half down from `end`. (torch's vectorised CPU kernel differs from this
    in the last bit for some elements, depending on the CPU's vector width: a 1e-7 relative effect.)"""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float32((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps)
    up = start32 + step * i.astype(np.float32)
    down = end32 - step * (steps - 1 - i).astype(np.float32)
    return np.where(i < steps // 2, up, down).astype(np.float32)


def _alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod accumulates float32 in double and rounds each output.
    return np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)


def _spaced_timesteps(spacing: str, num_train: int, n: int, steps_offset: int, *, integer: bool) -> np.ndarray:
    """The inference timesteps, largest first, as diffusers' set_timesteps computes them.

    integer=False: EulerDiscreteScheduler (float32, "linspace" keeps fractions); True: DDIMScheduler.
    """
    if spacing == "linspace":
        if integer:
            return np.linspace(0, num_train - 1, n).round()[::-1].astype(np.int64)
        return np.linspace(0, num_train - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = num_train // n
        t = (np.arange(0, n) * ratio).round()[::-1].copy()
        return t.astype(np.int64) + steps_offset if integer else t.astype(np.float32) + np.float32(steps_offset)
    if spacing == "trailing":
        step = num_train / n
        t = np.round(np.arange(num_train, 0, -step))
        return t.astype(np.int64) - 1 if integer else t.astype(np.float32) - np.float32(1)
    raise ValueError(f"timestep_spacing={spacing!r} is not supported (use 'leading', 'trailing' or 'linspace')")


def _expand(x: jax.Array, ndim: int) -> jax.Array:
    """[B] -> [B, 1, ..., 1] with `ndim` dims in all (diffusers' unsqueeze loop)."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


class _ScheduleState:
    """What every schedule state has: `timesteps` [n], one per inference step."""

    timesteps: jax.Array

    @property
    def num_inference_steps(self) -> int:
        """n, the number of steps in the schedule (a static int, also under jit)."""
        return self.timesteps.shape[0]


@flax.struct.dataclass
class EulerState(_ScheduleState):
    """timesteps [n] float32 (the model's timestep inputs), sigmas [n + 1] float32 (last one 0),
    init_noise_sigma [] float32."""

    timesteps: jax.Array
    sigmas: jax.Array
    init_noise_sigma: jax.Array


@flax.struct.dataclass
class DDIMState(_ScheduleState):
    """timesteps [n] int32; alpha_prod_t / alpha_prod_t_prev [n] float32: alphas_cumprod at each step's
    timestep and at `timestep - num_train_timesteps // n` (final_alpha_cumprod when that is < 0)."""

    timesteps: jax.Array
    alpha_prod_t: jax.Array
    alpha_prod_t_prev: jax.Array
    init_noise_sigma: jax.Array


@dataclasses.dataclass(frozen=True)
class _Scheduler:
    """Shared configuration and helpers; subclasses add their settings, set_timesteps and step."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    # diffusers class name, and settings that diffusers' class has but this port only supports at the
    # given value (anything else changes the numerics, so it is refused).
    diffusers_class: ClassVar[str] = ""
    _fixed: ClassVar[dict[str, Any]] = {"rescale_betas_zero_snr": False}
    _prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")

    def __post_init__(self):
        if self.prediction_type not in self._prediction_types:
            raise ValueError(
                f"prediction_type={self.prediction_type!r} is not supported by "
                f"{type(self).__name__} (use one of {self._prediction_types})"
            )
        # Validates the spacing and the beta schedule now rather than at the first set_timesteps.
        _spaced_timesteps(self.timestep_spacing, self.num_train_timesteps, 1, self.steps_offset, integer=True)
        _beta_table(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule, self.trained_betas)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Mapping[str, Any]):
        """From a diffusers scheduler config dict (scheduler_config.json). Keys starting with `_` and
        settings only other scheduler classes use are ignored; a setting this class would need at a
        value it does not implement, or an unknown key, raises ValueError naming it."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key in fields:
                kwargs[key] = tuple(value) if key == "trained_betas" and value is not None else value
            elif key in cls._fixed:
                if value != cls._fixed[key]:
                    raise ValueError(
                        f"scheduler setting {key}={value!r} is not supported by {cls.__name__} "
                        f"(only {cls._fixed[key]!r})"
                    )
            elif key not in _FOREIGN_KEYS:
                raise ValueError(f"unknown scheduler setting {key!r} for {cls.__name__}")
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike):
        """From a folder holding scheduler_config.json (a pipeline's `scheduler/` folder, or a pipeline
        folder that has one)."""
        return cls.from_config(read_scheduler_config(directory))

    # ---- tables -------------------------------------------------------------------------------
    @property
    def alphas_cumprod(self) -> np.ndarray:
        """[num_train_timesteps] float32, host numpy."""
        return _alphas_cumprod(
            _beta_table(
                self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule, self.trained_betas
            )
        )

    def add_noise(self, original_samples: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """Forward diffusion for training, diffusers' DDPMScheduler/DDIMScheduler.add_noise:
        sqrt(a_t) * x0 + sqrt(1 - a_t) * noise with a_t = alphas_cumprod[timesteps].

        original_samples, noise: [B, ...]; timesteps: [B] ints in [0, num_train_timesteps). jit-able.
        (diffusers' EulerDiscreteScheduler.add_noise is the sigma form x0 + sigma * noise of the
        inference schedule, used for img2img; use `add_noise_at_index` of the Euler scheduler for it.)
        """
        dtype = original_samples.dtype
        ac = jnp.asarray(self.alphas_cumprod).astype(dtype)[timesteps]
        sqrt_alpha = _expand(ac**0.5, original_samples.ndim)
        sqrt_one_minus = _expand((1 - ac) ** 0.5, original_samples.ndim)
        return sqrt_alpha * original_samples + sqrt_one_minus * noise

    def get_velocity(self, sample: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """v-prediction training target (diffusers' get_velocity): sqrt(a_t) * noise - sqrt(1 - a_t) * x0."""
        ac = jnp.asarray(self.alphas_cumprod).astype(sample.dtype)[timesteps]
        return _expand(ac**0.5, sample.ndim) * noise - _expand((1 - ac) ** 0.5, sample.ndim) * sample

    def _timesteps(self, num_inference_steps: int, *, integer: bool) -> np.ndarray:
        """`set_timesteps`' timesteps (`_spaced_timesteps`); ValueError for a step count outside
        [1, num_train_timesteps]."""
        n = int(num_inference_steps)
        if not 1 <= n <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps={n} must be in [1, {self.num_train_timesteps}]")
        return _spaced_timesteps(self.timestep_spacing, self.num_train_timesteps, n, self.steps_offset, integer=integer)

    def init_noise_sigma(self, state) -> jax.Array:
        """Scale of the initial latent noise (float32 scalar)."""
        return state.init_noise_sigma


@dataclasses.dataclass(frozen=True)
class EulerDiscreteScheduler(_Scheduler):
    """diffusers' EulerDiscreteScheduler (deterministic: s_churn = 0), "linear" sigma interpolation,
    discrete timesteps, final sigma "zero" or "sigma_min"."""

    interpolation_type: str = "linear"
    final_sigmas_type: str = "zero"
    timestep_spacing: str = "linspace"

    diffusers_class: ClassVar[str] = "EulerDiscreteScheduler"
    _fixed: ClassVar[dict[str, Any]] = {
        "rescale_betas_zero_snr": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_type": "discrete",
    }

    def __post_init__(self):
        super().__post_init__()
        if self.interpolation_type != "linear":
            raise ValueError(
                f"scheduler setting interpolation_type={self.interpolation_type!r} is not supported (only 'linear')"
            )
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type={self.final_sigmas_type!r} must be 'zero' or 'sigma_min'")

    def set_timesteps(self, num_inference_steps: int) -> EulerState:
        """Host-side; returns the schedule for `num_inference_steps` steps."""
        timesteps = self._timesteps(num_inference_steps, integer=False)
        ac = self.alphas_cumprod
        train_sigmas = np.sqrt((np.float32(1) - ac) / ac)  # float32, as diffusers (torch float32)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)  # float64
        last = train_sigmas[0] if self.final_sigmas_type == "sigma_min" else 0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        max_sigma = sigmas.max()
        if self.timestep_spacing in ("linspace", "trailing"):
            init = max_sigma
        else:
            init = np.sqrt(max_sigma * max_sigma + np.float32(1))
        return EulerState(
            timesteps=jnp.asarray(timesteps, jnp.float32),
            sigmas=jnp.asarray(sigmas),
            init_noise_sigma=jnp.asarray(init, jnp.float32),
        )

    def scale_model_input(self, state: EulerState, sample: jax.Array, i) -> jax.Array:
        """sample / sqrt(sigma_i^2 + 1)."""
        sigma = state.sigmas[i]
        return sample / jnp.sqrt(sigma * sigma + 1).astype(sample.dtype)

    def step(self, state: EulerState, model_output: jax.Array, i, sample: jax.Array) -> jax.Array:
        """One Euler step from step index i to i + 1 (prev_sample, in model_output's dtype)."""
        out_dtype = model_output.dtype
        sample = sample.astype(jnp.float32)
        sigma = state.sigmas[i]
        sigma_hat = sigma  # s_churn = 0: gamma = 0
        if self.prediction_type == "epsilon":
            pred_original = sample - sigma_hat * model_output
        elif self.prediction_type == "v_prediction":
            pred_original = model_output * (-sigma / jnp.sqrt(sigma * sigma + 1)) + sample / (sigma * sigma + 1)
        else:  # "sample"
            pred_original = model_output
        derivative = (sample - pred_original) / sigma_hat
        dt = state.sigmas[i + 1] - sigma_hat
        return (sample + derivative * dt).astype(out_dtype)

    def add_noise_at_index(self, state: EulerState, original_samples: jax.Array, noise: jax.Array, i) -> jax.Array:
        """diffusers' EulerDiscreteScheduler.add_noise at a schedule index (img2img): x0 + sigma_i * noise."""
        return original_samples + noise * state.sigmas[i].astype(original_samples.dtype)


@dataclasses.dataclass(frozen=True)
class DDIMScheduler(_Scheduler):
    """diffusers' DDIMScheduler with eta = 0 (deterministic DDIM)."""

    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    timestep_spacing: str = "leading"

    diffusers_class: ClassVar[str] = "DDIMScheduler"
    _fixed: ClassVar[dict[str, Any]] = {"rescale_betas_zero_snr": False, "thresholding": False}

    def set_timesteps(self, num_inference_steps: int) -> DDIMState:
        """Host-side; returns the schedule for `num_inference_steps` steps."""
        n = int(num_inference_steps)
        timesteps = self._timesteps(n, integer=True)
        ac = self.alphas_cumprod
        final = np.float32(1.0) if self.set_alpha_to_one else ac[0]
        # diffusers steps back by num_train // n whatever the spacing.
        prev = timesteps - self.num_train_timesteps // n
        alpha_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final).astype(np.float32)
        return DDIMState(
            timesteps=jnp.asarray(timesteps, jnp.int32),
            alpha_prod_t=jnp.asarray(ac[timesteps]),
            alpha_prod_t_prev=jnp.asarray(alpha_prev),
            init_noise_sigma=jnp.asarray(1.0, jnp.float32),
        )

    def scale_model_input(self, state: DDIMState, sample: jax.Array, i) -> jax.Array:
        """Returns `sample` unchanged: DDIM does not scale the model input (same signature as Euler's)."""
        del state, i
        return sample

    def step(self, state: DDIMState, model_output: jax.Array, i, sample: jax.Array) -> jax.Array:
        """One DDIM step (eta = 0) from step index i to i + 1."""
        alpha_prod_t = state.alpha_prod_t[i]
        alpha_prod_t_prev = state.alpha_prod_t_prev[i]
        beta_prod_t = 1 - alpha_prod_t
        if self.prediction_type == "epsilon":
            pred_original = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
            pred_epsilon = model_output
        elif self.prediction_type == "sample":
            pred_original = model_output
            pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original) / beta_prod_t**0.5
        else:  # v_prediction
            pred_original = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
            pred_epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
        if self.clip_sample:
            pred_original = jnp.clip(pred_original, -self.clip_sample_range, self.clip_sample_range)
        std_dev_t = 0.0  # eta = 0
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_epsilon
        return alpha_prod_t_prev**0.5 * pred_original + pred_sample_direction


# By the short name the CLIs offer (`--scheduler`) and by the diffusers class name a scheduler config's
# `_class_name` gives; a new scheduler is one more class here.
SCHEDULER_NAMES = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}
SCHEDULERS: dict[str, type[EulerDiscreteScheduler] | type[DDIMScheduler]] = {
    **SCHEDULER_NAMES,
    **{cls.__name__: cls for cls in SCHEDULER_NAMES.values()},
}
Scheduler = EulerDiscreteScheduler | DDIMScheduler


def read_scheduler_config(directory: str | os.PathLike | None, *, default: Mapping[str, Any] | None = None) -> dict:
    """scheduler_config.json of `directory` or of `directory/scheduler`; `default` (e.g. SDXL_SCHEDULER_CONFIG)
    when there is none (or no directory), else FileNotFoundError."""
    if directory:
        directory = Path(directory)
        for path in (directory / SCHEDULER_CONFIG, directory / "scheduler" / SCHEDULER_CONFIG):
            if path.is_file():
                return read_json(path)
    if default is not None:
        return dict(default)
    raise FileNotFoundError(f"{directory}: no {SCHEDULER_CONFIG} (nor scheduler/{SCHEDULER_CONFIG})")


def scheduler_from_config(config: Mapping[str, Any], name: str | None = None) -> Scheduler:
    """Builds the scheduler `name` ("euler", "ddim", or a diffusers class name; default: the config's
    `_class_name`) from a diffusers scheduler config dict."""
    name = name or config.get("_class_name")
    if name not in SCHEDULERS:
        raise ValueError(f"unsupported scheduler {name!r} (use one of {sorted(SCHEDULERS)})")
    return SCHEDULERS[name].from_config(config)


def scheduler_from_pretrained(directory: str | os.PathLike, name: str | None = None) -> Scheduler:
    """scheduler_from_config of the folder's scheduler_config.json."""
    return scheduler_from_config(read_scheduler_config(directory), name)
