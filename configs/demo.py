"""The embedded default: tiny random model on the demo dataset, CPU, a few minutes; the loss falls, and
the last step writes validation images of 4 training identities (WORKDIR/samples/150/, TensorBoard).

    python -m persongen_jax.train --config configs/demo.py --workdir /tmp/persongen_demo

The demo dataset is built into WORKDIR/demo_data (`python -m persongen_jax.data.make_demo`) when
config.data.dir is empty; `--config.data.source=synthetic` trains on generated arrays instead.
"""

from configs import default


def get_config():
    c = default.tiny_model(default.get_config())  # LoRA rank 4, 32 px, 2 references
    c.adapters.names = ("bg",)
    # A from-scratch tiny model learns with larger steps than the pretrained research runs.
    c.trainable.heads.lr = 1e-3
    c.trainable.fuse_mlp.lr = 1e-3
    c.trainable.lora.lr = 3e-3
    c.trainable.adapters = default.group("adapters", 1e-3)
    c.optim.warmup_steps = 10
    c.optim.grad_clip_norm = 1.0
    c.data.global_batch_size = 8
    c.total_steps = 150
    c.log_every = 5
    c.checkpoint_every = 50
    c.keep_checkpoints = 2
    # Validation images at the end (WORKDIR/samples/150/ and TensorBoard): 4 training identities x 2 prompts
    # x 2 seeds; no scoring models, so no scores.
    c.eval_every = 150
    c.eval.num_prompts = 2
    c.eval.seeds = (0, 1)
    c.eval.num_steps = 20
    return c
