"""Defaults shared by every experiment (the research's hyperparameters); not run directly.

`configs/baseline.py` is the research's baseline on top of these; every other experiment imports the
baseline (or the experiment it extends) and states only its difference (`from configs import baseline`).
Launch pattern:

    python -m persongen_jax.train --config configs/baseline.py --workdir runs/baseline \
        --config.init.sdxl=weights/sdxl --config.data.dir=data/ffhq_ids
"""

import ml_collections

from persongen_jax.pipeline.settings import SamplingSettings

SAMPLING = SamplingSettings()  # the sampling defaults of every entry point (generate, evaluate, the app)

# Trainable groups: regexes over dotted parameter paths (see persongen_jax/training/optimizer.py).
PATTERNS = {
    "heads": r"id_encoder\.visual_projection(_2)?\.kernel",  # image-encoder projection heads
    "image_encoder": r"id_encoder\.vision_model\..*",  # the whole CLIP vision tower
    "fuse_mlp": r"id_encoder\.fuse_module\..*",  # PhotoMaker's fuse MLP
    "lora": r".*\.lora_[AB]\.kernel",  # LoRA (LoRAParam), adapters' LoRA too
    "adapters": r"unet\..*\.processor\.to_[kv]\.[a-z0-9_]+\.(kernel|bias)",  # adapter k/v (AdapterParam)
    "image_proj": r"unet\.image_proj\..*",  # IP-Adapter identity projection head
    # PhotoMaker V2: the ArcFace token projection + face perceiver resampler (QFormerPerceiver)
    "qformer_perceiver": r"id_encoder\.qformer_perceiver\..*",
}


def group(name: str, lr: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"pattern": PATTERNS[name], "lr": lr})


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Resume from WORKDIR's latest checkpoint that restores. A config that changes parameter shapes or the
    # trained groups is then refused; False starts over (the previous run moves to WORKDIR/previous/<time>/).
    c.resume = True
    c.model = "sdxl"  # "sdxl": weights from config.init; "tiny": random tiny parts (tests, demo)
    c.dtype = "float32"  # compute dtype: "float32" | "bfloat16" (params stay float32)
    c.attention_impl = "xla"  # "xla" | "cudnn"
    # Storage dtype of the frozen parameters (UNet base, VAE, text encoders, frozen ID-encoder parts):
    # "bfloat16" halves their memory (what diffusers' training scripts do with weight_dtype); trainable
    # parameters and the optimizer state always stay float32. "float32": frozen weights bit-exact.
    c.frozen_dtype = "bfloat16"
    # Rematerialisation of the UNet's down/mid/up blocks in training: "none" | "full" (keep only each block's
    # inputs) | a jax.checkpoint policy name ("dots_saveable", "dots_with_no_batch_dims_saveable"). Same
    # gradients, less activation memory, more compute; docs/BENCHMARKS.md (scripts/bench/scale.py) shows
    # which setting fits sdxl_base at 512x512, batch 12 per device, in 80 GB.
    c.remat = "none"

    c.init = ml_collections.ConfigDict()
    c.init.sdxl = ""  # converted SDXL folder (unet, vae, text_encoder(_2), tokenizer(_2))
    c.init.photomaker = ""  # converted PhotoMaker folder (id_encoder/ [+ lora/])
    c.init.photomaker_lora = False  # also start the UNet LoRA from PhotoMaker's lora/
    c.init.id_encoder = ""  # an id_encoder folder (e.g. CLIP ViT-L/14 converted into PhotoMaker shape)
    c.init.ip_adapter = ""  # a converted adapters folder (IP-Adapter)

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 64  # 0: no LoRA
    c.lora.alpha = 64.0
    c.lora.targets = ("to_q", "to_k", "to_v", "to_out.0")

    c.adapters = ml_collections.ConfigDict()
    c.adapters.names = ()  # e.g. ("bg",) or ("bg", "body", "id")
    c.adapters.mode = "parallel"  # "parallel" (IP-Adapter) | "sequential" (the target method)
    c.adapters.scales = ()  # one per name; () = all 1.0
    c.adapters.copy_lora = False  # copy to_k/to_v LoRA into the adapter layers
    c.adapters.num_tokens = 4  # identity tokens of the image projection
    c.id_injection = "text"  # "text" (PhotoMaker fuse) | "cross_attn" (adapter "id") | "both"

    # Conditions besides the prompt (persongen_jax/conditions.py): kind "text" reads the captions field
    # `source`, kind "image" the person's reference faces; `drop` is the training dropout probability
    # (classifier-free guidance); `gated` ones enter sampling only after start_merge_step. Those named in
    # adapters.names get adapter cross-attentions. A new text condition is one more entry here, e.g.
    #   c.conditions.expr = dict(kind="text", source="caption_expr", drop=0.1); c.adapters.names += ("expr",)
    c.conditions = ml_collections.ConfigDict()
    c.conditions.id = dict(kind="image", source="references", drop=0.1, gated=True)  # the identity
    c.conditions.bg = dict(kind="text", source="caption_bg", drop=0.1, gated=False)  # P_bg
    c.conditions.body = dict(kind="text", source="caption_body", drop=0.1, gated=False)  # P_body

    c.trainable = ml_collections.ConfigDict()
    c.trainable.heads = group("heads", 1e-5)
    c.trainable.fuse_mlp = group("fuse_mlp", 1e-5)
    c.trainable.lora = group("lora", 1e-4)

    c.optim = ml_collections.ConfigDict()
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.warmup_steps = 500
    c.optim.grad_clip_norm = 0.0  # 0: off
    c.optim.grad_accum_steps = 1  # effective batch = global_batch_size x this

    c.loss = ml_collections.ConfigDict()
    c.loss.mask_loss_prob = 0.5
    c.loss.drop_text = 0.1  # the prompt (P_general) dropped; per-condition rates: config.conditions

    c.data = ml_collections.ConfigDict()
    c.data.source = "grain"  # "grain" (persongen_jax.data) | "synthetic" (no files)
    c.data.dir = ""  # empty: build the demo dataset into WORKDIR/demo_data
    c.data.global_batch_size = 24
    c.data.resolution = 512
    c.data.num_refs = 4  # K reference crops at most; each example draws 1..K (min_refs..K)
    c.data.min_refs = 1
    c.data.worker_count = 0  # grain worker processes (0: threads of this process)
    c.data.trigger_word = "img"

    c.sharding = ml_collections.ConfigDict()
    c.sharding.mesh_shape = (-1,)
    c.sharding.mesh_axes = ("data",)
    # ("params", "data") turns on FSDP.
    c.sharding.logical_axis_rules = (("batch", "data"), ("params", None))

    # Multi-host (persongen_jax/training/distributed.py): every process runs the same command. "auto" joins
    # the job when coordinator_address is set or the environment names one (JAX_COORDINATOR_ADDRESS, SLURM
    # with several tasks, Open MPI); "always" lets jax.distributed.initialize() detect the cluster
    # (Kubernetes, Cloud TPU too); "never": single process. 0 / -1: taken from the environment.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = "auto"
    c.distributed.coordinator_address = ""  # "host:port" of process 0
    c.distributed.num_processes = 0
    c.distributed.process_id = -1

    c.total_steps = 10_000
    c.log_every = 10
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    # Checkpoints written by a background thread while training continues (the step loop only waits for
    # the device->host copy); False: every save blocks until its files are complete.
    c.async_checkpointing = True
    c.eval_every = 1000  # validation images (+ scores) every N steps (0: never)

    # Validation during training (`python -m persongen_jax.evaluate` mode B with the current params).
    c.eval = ml_collections.ConfigDict()
    c.eval.sets = ""  # "in_train=DIR,out_of_train=DIR,out_of_domain=DIR"; empty: training identities
    c.eval.num_identities = 4  # without eval.sets: this many training identities (a fixed sample)
    c.eval.metrics = ("clip_t", "face_sim")  # by name (evaluation/metrics.py); scored when their models are set
    c.eval.clip = ""  # converted CLIP (weights_conversion clip), e.g. clip-vit-large-patch14
    c.eval.dino = ""  # converted DINO ViT (weights_conversion dino facebook/dino-vits16 DST): metric dino
    c.eval.inception = ""  # converted FID InceptionV3 (weights_conversion inception): metric fid
    c.eval.fid_reference = ""  # FID reference: an image folder or pytorch-fid's .npz statistics
    c.eval.lpips = ""  # converted LPIPS (weights_conversion lpips): metric face_div
    c.eval.face_detector = ""  # insightface model folder with an SCRFD detector (antelopev2 / buffalo_l)
    c.eval.arcface = ""  # converted ArcFace (weights_conversion arcface glintr100.onnx DST)
    c.eval.prompts = ""  # prompts JSON; empty: the research's 4 (evaluation/validation_prompts.json)
    c.eval.num_prompts = 0  # 0: all prompts of the file
    c.eval.seeds = (0, 1, 2, 3, 4)
    c.eval.num_steps = SAMPLING.num_steps
    c.eval.guidance_scale = SAMPLING.guidance_scale
    c.eval.start_merge_step = SAMPLING.start_merge_step  # a step index, or a fraction of num_steps (0.2: 10 of 50)
    c.eval.resolution = 0  # 0: data.resolution
    c.eval.split = "auto"  # P_general + P_bg when the model has a bg adapter ("never" | "always")
    c.eval.no_face = "zero"  # no face in a generation: scores 0 ("zero", the research) | "skip"
    c.eval.det_thresh = 0.5
    c.eval.face_select = "largest"  # the face scored in a generation: "largest" | "score" (most confident)
    c.progress_bar = True
    return c


def tiny_model(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The tiny random model (LoRA rank 4 at most) at its data size, 32 px and 2 reference crops: what
    `tiny` and the demo (configs/demo.py) train."""
    c.model = "tiny"
    c.lora.rank = min(c.lora.rank, 4) if c.lora.rank else 0
    c.lora.alpha = float(c.lora.rank)
    c.data.resolution = 32
    c.data.num_refs = 2
    return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `runlocal` shrink: tiny random model, synthetic data, a few CPU steps."""
    tiny_model(c)
    c.frozen_dtype = "float32"  # CPU checks compare against float32 references
    c.data.source = "synthetic"
    c.data.global_batch_size = 4
    c.total_steps = 2
    c.log_every = 1
    c.checkpoint_every = 2
    c.optim.warmup_steps = 1
    c.progress_bar = False
    return c


def photomaker_v2(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The PhotoMaker V2 ID encoder (`training/model.py`): its keys exist only in V2 configs, so the v1 configs
    and their runs stay as they were."""
    c.id_encoder = "photomaker_v2"  # absent: "photomaker_v1"
    # A converted ArcFace (weights_conversion arcface w600k_r50.onnx DST, the official pipeline's buffalo_l R50):
    # embeds the references of records without a stored embedding. Empty: every record must have one.
    c.init.arcface = ""
    return c


def from_clip(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Reproduction exps. 1-4 (5.1.1-5.1.4): the ID encoder from CLIP weights (config.init.id_encoder), not
    PhotoMaker's, so the UNet LoRA starts fresh too, and no warmup."""
    c.init.photomaker_lora = False
    c.optim.warmup_steps = 0
    return c


def groups(**lrs) -> ml_collections.ConfigDict:
    """config.trainable with exactly these groups: groups(heads=1e-5, lora=1e-4)."""
    return ml_collections.ConfigDict({name: group(name, lr) for name, lr in lrs.items()})


def variant(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """`--config configs/X.py:tiny` applies `tiny` (the runlocal variant); no arg: the full run."""
    if not arg:
        return c
    if arg != "tiny":
        raise ValueError(f"unknown config variant {arg!r}; known: 'tiny'")
    return tiny(c)
