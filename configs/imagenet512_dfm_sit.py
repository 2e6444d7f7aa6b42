"""The released DFM-SiT-XL/2 (ImageNet 512 px, SD-VAE latents) of the authors' code.

The public DFM reimplementation (snap-research/elit, ``models/sit_dfm.py``,
``experiments/train/dfm_sit_xl_512.yaml``) trained DFM-SiT-XL/2 for 400k steps at
batch 256 and released ``dfm_sit_imagenet_512px_1k_0400000.pt``: FID-50K 18.74,
IS 80.16 (precision 0.442, recall 0.537) with cfg 1.0, Euler [40, 10] steps,
tau 0.9 (their SiT-XL/2 baseline: 21.82 / 67.58). Evaluate it in JAX with::

    python -m dfm_jax.eval --config=configs/imagenet512_dfm_sit.py --workdir=/tmp/dfm_sit \
        --init=dfm_sit_imagenet_512px_1k_0400000.pt \
        --config.autoencoder.weights=sd-vae-ft-ema/diffusion_pytorch_model.safetensors \
        --metrics=fid,is --inception_weights=pt_inception-2015-12-05-6726825d.pth \
        --reference=VIRTUAL_imagenet512.npz

``--init`` imports the EMA weights (``dfm_jax.weights.dfm_sit``, which also converts
the SiT time/velocity convention once, into the weights); ``--init_key=model`` takes
the raw ones. Evaluation with ``--init`` reads no data: the latent shape (64x64x4) and
the 1000 classes come from ``config.data``.
The official sampler ran in float32 (TF32 matmuls); ``--config.model.dtype=float32``
is the closest match, the default bfloat16 the faster one.

The architecture is the paper's DFM-DiT as the authors reimplemented it: DiT-XL
(28/1152/16), SD-VAE latents 64x64x4 (512 px / 8, scaled by 0.18215), two scales
32 -> 64 with patches (1, 2) (a 32x32 token grid), fixed 2-D sin-cos positions, no
stage embedding, no preconditioning, unstandardised Laplacian scales, 1000 classes
(+ the null class). The training fields reproduce their run, for fine-tuning:
AdamW (0.9, 0.999), eps 1e-8, no weight decay, lr 1e-4 without warm-up, clip 1.0,
EMA 0.9999 from step 0, label dropout 0.1, p_q = (0.9, 0.1) drawn once per batch,
earlier scales at LogitNormal(2, 1) (their ``location = -2`` in the SiT convention),
bf16.

Data: an ArrayRecord latent dataset of SD-VAE (ft-EMA) posterior moments written by
``python -m dfm_jax.prepare`` (``--config.data.dir``), with the 0.18215 scaling.
"""

from configs import imagenet512


def get_config():
    config = imagenet512.get_config()
    config.total_steps = 400_000
    config.batch_size = 256

    config.data.source = "array_record"
    config.data.num_classes = 1000
    config.data.resolution = 64  # latent size (512 px / 8); `eval --init` reads it from here
    config.data.channels = 4
    config.data.latent_sample = True  # the official training samples the posterior

    config.autoencoder.name = "sd-vae-ft-ema"  # the official evaluation's `vae: ema`

    config.pyramid.kind = "laplacian"
    config.pyramid.ratios = (2,)
    config.pyramid.standardize = False

    config.objective.stage_probs = (0.9, 0.1)
    config.objective.earlier_location = 2.0
    config.objective.stage_sampling = "per_batch"
    config.objective.label_dropout = 0.1

    config.model.size = "XL"
    config.model.patch_sizes = (1, 2)
    # DFM-SiT-XL/2 has 16 heads (not recorded in the weights): XL's own, so they are not
    # set here, and --config.model.size=S gives S's 6 heads, not 16 of head dim 24.
    config.model.positions = "sincos"
    config.model.stage_embedding = False
    config.model.preconditioning = False
    config.model.dtype = "bfloat16"

    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 0
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.0
    config.optimizer.grad_clip = 1.0
    config.optimizer.ema_decay = 0.9999
    config.optimizer.ema_warmup = False

    # The released evaluation: cfg 1.0, Euler [40, 10], official threshold 0.1 = tau 0.9.
    config.sampling.steps_per_stage = (40, 10)
    config.sampling.thresholds = (0.9,)
    config.sampling.solver = "euler"
    config.sampling.cfg_scale = 1.0
    config.sampling.guidance_interval = (0.0, 1.0)
    return config
