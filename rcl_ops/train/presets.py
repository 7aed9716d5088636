"""Every preset as data: the quick and paper scales, the paper's optimisation, the presets of ``--preset``
(``PRESETS``) and the experiment of each table of the paper (``EXPERIMENTS``; as presets ``table1-quick``,
``table1-full``, ...). Nothing here imports the rest of the trainer: config.py validates these values,
experiments.py holds the paper's numbers they are compared with.
"""

from __future__ import annotations

# The paper's optimisation (Sec. 4.1.5, Appendix A): Adam (0.9, 0.999, 1e-7), lr 1e-3, alpha 1e-3; shared by
# the presets that follow it. The paper takes its temperature "following SimCLR" without a value: the
# trainer's per-distance default applies (methods.DEFAULT_TEMPERATURES).
PAPER_OPTIMISATION = {
    "lr": 1e-3,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_eps": 1e-7,
    "alpha": 1e-3,
}


# ---------------------------------------------------------------------------------------------
# The two scales, shared with the quick and paper presets (PRESETS below). quick: CPU minutes on the 17
# bundled photographs cut into 128x128 tiles (287 train tiles of 13 photographs / 59 test tiles of 4), noise
# up to 50/255, crops 48, a residual U-Net of width 16 and depth 2, 100 pre-training steps at batch 8, 150
# fine-tuning steps, three seeds. full (the paper's
# settings, Sec. 4.1.5): for a GPU and the user's data (--data-dir; ImageNet g_e weights via
# --encoder-weights); the paper states no step counts, 20000 pre-training and 2000 fine-tuning are ours.

QUICK_SCALE = {
    # all 17 sample images (10 grey ones replicated to RGB), so that the test set holds 4 photographs (coffee,
    # gravel, moon, rocket: 59 tiles) and the intervals over photographs x seeds have 3 degrees of freedom; the
    # 7 colour images alone leave 2 test photographs (1 degree of freedom)
    "bundled_images": "all",
    # noise std up to 50/255 (input PSNR 22.2 dB on the test tiles): where N2N and the Oracle beat the noisy
    # input within 100 steps; at 20/255 no network beat it within the CPU budget (README)
    "sigma_max": 50.0,
    "tile_size": 128,
    "crop_size": 48,
    "width": 16,
    "depth": 2,
    "encoders": ["random"],
    "pretrain_steps": 100,
    "batch_size": 8,
    "finetune_steps": 150,
    "finetune_batch_size": 8,
    "finetune_lr": 1e-2,
    "finetune_schedule": "cosine",
    "seeds": [0, 1, 2],
    "checkpoint_every": 100,
    "log_every": 10,
    "density_batches": 4,
    # One torch thread: on a 2-core machine that is also busy with something else, two OpenMP threads ran up
    # to 10x slower per step (measured), one thread at most ~1.6x slower than two on an idle machine.
    "threads": 1,
}

PAPER_SCALE = {
    "crop_size": 128,
    "width": 32,
    "depth": 4,
    "pretrain_steps": 20000,
    "batch_size": 64,
    **PAPER_OPTIMISATION,
    "contrast_reduction": "sum",
    "encoders": ["file"],  # ImageNet weights: refused without --encoder-weights unless --encoders is given
    "finetune_steps": 2000,
    "finetune_batch_size": 32,
    "seeds": [0, 1, 2, 3, 4],
}

# Every RCL table also runs RCL-EMD's two controls on the same seeds (not in the paper): the consistency loss
# alone (alpha 0) and the contrastive term alone, so that each table says whether each term helps.
RCL_CONTROLS = ["consistency", "contrast-emd"]
RCL_WITH_CONTROLS = ["rcl-emd", *RCL_CONTROLS]

# The downstream tasks of each table of the paper (experiments.PAPER_TABLES: its columns).
TABLE_TASKS: dict[str, list[str]] = {
    "table1": ["denoise"],
    "table2": ["sr2", "jdensr2"],
    "table3": ["denoise"],
    "table4": ["jdd", "jdemsr2", "jddsr2"],
    "table5": ["denoise"],
}

_TABLE_OPTIONS: dict[str, dict] = {
    "table1": {"methods": ["moco", "pixcl", "n2n", "n2s", "rcl-bd", "rcl-emd", "rcl-mmd", *RCL_CONTROLS, "oracle"]},
    "table2": {"methods": ["n2n", "n2s", "sl-denoise", "rcl-bd", "rcl-emd", "rcl-mmd", *RCL_CONTROLS, "oracle"]},
    "table3": {"methods": [*RCL_WITH_CONTROLS]},
    "table4": {"modality": "raw", "methods": ["sl-jdd", "m2m", *RCL_WITH_CONTROLS, "oracle"]},
    "table5": {"model": "dncnn", "methods": [*RCL_WITH_CONTROLS], "labels": ["30%", "all"]},
}

EXPERIMENTS: dict[str, dict[str, dict]] = {
    name: {
        "quick": {**QUICK_SCALE, **options, "tasks": TABLE_TASKS[name]},
        "full": {**PAPER_SCALE, **options, "tasks": TABLE_TASKS[name]},
    }
    for name, options in _TABLE_OPTIONS.items()
}
# Table 3: the paper's 10 ... 10^4 labels; the quick data has 200 training tiles.
EXPERIMENTS["table3"]["quick"].update(labels=["10", "50", "all"], sl_steps=150, sl_lr=1e-3)
EXPERIMENTS["table3"]["full"].update(labels=["10", "100", "1000", "10000"], sl_steps=20000)
# Table 5 needs real noisy pairs (SIDD layout, --data-dir): full reads them. quick has none bundled, so it
# runs the same protocol on the bundled images with simulated noise, a stand-in that says so in its table.
EXPERIMENTS["table5"]["quick"].update(width=16, depth=5, sl_steps=150, sl_lr=1e-3)
EXPERIMENTS["table5"]["full"].update(
    data_format="sidd", test_fraction=0.2, width=None, depth=None, sl_steps=20000, finetune_steps=2000
)
# The full Table 4 runs on RAW data: the consistency loss of Eq. 11 needs no encoder.
EXPERIMENTS["table4"]["full"]["encoders"] = ["random"]
EXPERIMENTS["table3"]["full"]["methods"] = [*RCL_WITH_CONTROLS]

SCALES = ("quick", "full")

# Every experiment as a preset: 'table1-quick', 'table1-full', ...
EXPERIMENT_PRESETS = {
    f"{name}-{scale}": options for name, scales in EXPERIMENTS.items() for scale, options in scales.items()
}

PRESETS: dict[str, dict] = {
    # A smoke-level demo of the whole pipeline on a 2-core CPU in under 5 minutes (``make demo``): the 17
    # sample images cut into 128x128 tiles after the split (287 training tiles of 13 photographs, 59 test
    # tiles of 4 others), noise up to 50/255, crops 48, a small residual U-Net, three seeds (so that a
    # difference can be told from noise), denoising only, RCL-EMD with one (random) encoder and its two
    # controls, N2N and the Oracle (N2S and the no-pre-training row are left to --preset small, for time:
    # with them the demo took 6.3 minutes on 2 idle cores), few steps and a larger fine-tuning learning rate,
    # cosine-annealed. Too short to rank the methods: see --preset small. One torch thread: on a 2-core
    # machine that is also busy with something else, two OpenMP threads ran up to 10x slower per step
    # (measured), one thread at most ~1.6x slower than two on an idle machine.
    "quick": {**QUICK_SCALE, "methods": [*RCL_WITH_CONTROLS, "n2n", "oracle"], "tasks": ["denoise"]},
    # The most faithful setting that a 2-core CPU runs in about 30 minutes: the paper's optimiser (Adam
    # (0.9, 0.999, 1e-7), lr 1e-3), alpha 1e-3, L_contrast summed over the batch, three seeds; the quick data
    # (128x128 tiles of the 17 sample images, noise up to 50/255), so that a batch holds 16 distinct noise
    # levels. Smaller than the paper where the time demands it: batch 16 (paper 64), crops 64 (paper 128),
    # a residual U-Net of width 16 and depth 3, 200 pre-training steps. The paper's ImageNet encoder is not
    # available offline: g_e is pre-trained on the noisy training tiles (--encoders self).
    "small": {
        **QUICK_SCALE,
        "crop_size": 64,
        "depth": 3,
        "methods": [*RCL_WITH_CONTROLS, "n2n", "n2s", "oracle", "random"],
        "encoders": ["self"],
        "encoder_pretrain_steps": 200,
        "pretrain_steps": 200,
        "batch_size": 16,
        **PAPER_OPTIMISATION,
        "contrast_reduction": "sum",
        "tasks": ["denoise"],
        "finetune_steps": 300,
        "finetune_batch_size": 16,
    },
    # Sec. 4.4 / Table 5 on real noisy data in the SIDD layout (--data-dir, supplied by the user): a DnCNN,
    # 80/20 split, crops 128, batch 64, constant lr 1e-3; RCL pre-training on all training images, then
    # RCL+SL on 30% of the labels against SL on all of them. ImageNet encoder weights as in the paper.
    "sidd": {
        "data_format": "sidd",
        "test_fraction": 0.2,
        "model": "dncnn",
        "crop_size": 128,
        "methods": ["rcl-emd"],
        "encoders": ["file"],
        "pretrain_steps": 20000,
        "batch_size": 64,
        **PAPER_OPTIMISATION,
        "tasks": ["denoise"],
        "finetune_steps": 2000,
        "finetune_batch_size": 32,
        "labels": ["30%", "all"],
        "sl_steps": 20000,
        "seeds": [0, 1, 2, 3, 4],
    },
    # The paper's batch 64 and crops 128 sized for one H100/H200 in about 4 minutes (not measured on a GPU
    # yet; CPU step times in the README): the 17 sample images in 192x192 tiles (103 training tiles of 13
    # photographs, 20 test tiles of 4), noise up to 50/255, the paper's U-Net (width 32, depth 4) and
    # optimiser, RCL-EMD with its controls and the baselines, 300 pre-training and 300 fine-tuning steps,
    # three seeds.
    "gpu-small": {
        **QUICK_SCALE,
        "tile_size": 192,
        "crop_size": 128,
        "width": 32,
        "depth": 4,
        "batch_size": 64,
        **PAPER_OPTIMISATION,
        "methods": [*RCL_WITH_CONTROLS, "n2n", "n2s", "oracle", "random"],
        "tasks": ["denoise"],
        "pretrain_steps": 300,
        "finetune_steps": 300,
        "finetune_batch_size": 32,
        "checkpoint_every": 300,
        "threads": None,
    },
    # The paper's settings (Sec. 4.1.5, Appendix A): Adam (0.9, 0.999, 1e-7), lr 1e-3, batch 64,
    # crops 128, alpha 1e-3, five trials, all three distances. Needs >= 64 training images. The paper
    # states no step counts; 20000 pre-training and 2000 fine-tuning steps are our choice. RCL-MMD at
    # crops 128 needs a native backend (cpu/cuda "grid" method): the reference backend's exact O(M^2)
    # sum over M = 49152 values per residual is far too slow.
    "paper": {**PAPER_SCALE, "methods": ["rcl-emd", "rcl-mmd", "rcl-bd", "n2n", "n2s", "oracle"]},
}
PRESETS.update(EXPERIMENT_PRESETS)
