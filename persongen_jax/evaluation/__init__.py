"""Evaluation: CLIP-T (clip_t), face detection + alignment (faces), Face-Sim (face_sim), the validation
protocol and manifest scoring (protocol), reports and plots (report); CLI: `python -m persongen_jax.evaluate`."""
