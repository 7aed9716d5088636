"""Command line: ``rcl-train`` / ``python -m rcl_ops.train``.

Every TrainConfig field is a flag; only flags given explicitly override the preset and the
config file, so ``--preset quick --pretrain-steps 500`` changes just the step count.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import TrainConfig, build_config, config_fields, config_to_dict
from .config_checks import field_type, flag
from .images import DataError
from .presets import EXPERIMENTS, PRESETS, SCALES

DESCRIPTION = """\
Residual contrastive learning (RCL) pre-training on noisy images and its proxy evaluation.

Pre-trains a restoration network (U-Net or DnCNN) on noisy images without clean labels with
RCL (residual contrastive loss with an EMD, MMD or Bhattacharyya distance, plus the
consistency loss) and with the baselines noise2noise, noise2self, mosaic2mosaic (RAW), a MoCo
v2-style ResNet-FCN and a pixel-level contrastive U-Net (RGB), and supervised pre-training (the
Oracle of each task, SL on one task); then, for each downstream task (RGB: denoising, x2/x4
super-resolution, joint denoising + SR; RAW: joint demosaicing + denoising, + SR, all three),
freezes the network but its last layer (a ResNet-FCN: its decoder), re-initialises and fine-tunes
that with L1 on labelled images, and reports PSNR/SSIM on held-out test images (mean over seeds)
in tables shaped like the paper's, with the residual-distance density plot (Fig. 2) and sample
image grids.

Noise: heteroscedastic Gaussian, Var = lambda_shot * y + lambda_read (Eq. 3), with
sqrt(lambda_shot), sqrt(lambda_read) ~ U(a, b) per image (Eq. 16-17); RAW mode mosaics
(RGGB) first and adds noise after. With no --data-dir the images are scikit-image's bundled
sample images, so everything runs offline.
"""

EPILOG = (
    "presets:\n"
    + "\n".join(
        f"  {name}: " + ", ".join(f"{key}={value}" for key, value in values.items())
        for name, values in PRESETS.items()
        if not name.startswith("table")
    )
    + "\n  table1-quick ... table5-full: the experiments of rcl-train experiment (see rcl_ops/train/presets.py)"
    + """

one command per table of the paper (a quick CPU setting on the bundled images, or --scale full, the paper's):
  rcl-train experiment table1|table2|table3|table4|table5 [--scale quick|full] [any option above]
  writes paper_comparison.md (the paper's numbers beside ours) in the run folder

examples:
  rcl-train experiment table4                  # Table 4 (RAW: JDD, JDemSR, JDDSR; M2M, SL (JDD)) in minutes
  rcl-train --preset quick                      # a smoke-level demo of the pipeline on a CPU in minutes
  rcl-train --preset small                      # the most faithful CPU setting, about 30 minutes
  rcl-train --preset paper --data-dir photos/   # the paper's settings, for a GPU
  rcl-train --preset quick --methods rcl-emd rcl-bd n2n --tasks denoise --seeds 0 1 2
  rcl-train --config my_run.toml --resume       # continue the newest run in --output-dir
"""
)


def _none_or(scalar: type):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else scalar(text)

    parse.__name__ = scalar.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, generated from TrainConfig's fields and their help metadata."""
    parser = argparse.ArgumentParser(
        prog="rcl-train",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    defaults = TrainConfig()
    for f in config_fields():
        group_name = f.metadata["group"]
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        scalar, is_list, optional = field_type(f, TrainConfig)
        option = flag(f.name)
        default = getattr(defaults, f.name)
        shown = " ".join(map(str, default)) if is_list else default
        help_text = f.metadata["help"] + ("" if default is None else f" (default: {shown})")
        kwargs: dict = {"help": help_text.replace("%", "%%"), "dest": f.name}  # argparse formats help with %
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if scalar is bool:
            group.add_argument(option, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        kwargs["type"] = _none_or(scalar) if optional else scalar
        if is_list:
            kwargs["nargs"] = "+"
        kwargs["metavar"] = f.name.upper() if "choices" not in f.metadata else None
        if kwargs["metavar"] is None:
            del kwargs["metavar"]
        group.add_argument(option, **kwargs)
    parser.add_argument(
        "--print-config", action="store_true", default=False, help="print the resolved configuration as JSON and exit"
    )
    return parser


def experiment_main(argv: list[str]) -> int:
    """``rcl-train experiment tableN [--scale quick|full] [options]``: the preset ``tableN-<scale>`` with the
    options given, then paper_comparison.md beside results.md."""
    chooser = argparse.ArgumentParser(
        prog="rcl-train experiment",
        description="Run the experiment of one table of the paper and write paper_comparison.md (the paper's "
        "numbers beside ours) in the run folder. Any rcl-train option may follow and overrides the experiment's "
        "setting (see rcl-train --help).",
        add_help=True,
    )
    chooser.add_argument("table", choices=tuple(EXPERIMENTS), help="the paper's table")
    chooser.add_argument(
        "--scale",
        choices=SCALES,
        default="quick",
        help="quick: CPU minutes on the bundled images (default); full: the paper's settings, for a GPU and your data",
    )
    chosen, rest = chooser.parse_known_args(argv)
    return main(["--preset", f"{chosen.table}-{chosen.scale}", *rest], experiment=(chosen.table, chosen.scale))


def main(argv: list[str] | None = None, experiment: tuple[str, str] | None = None) -> int:
    """Entry point of ``rcl-train``; returns the process exit status (130 after Ctrl-C, with one line saying
    where the run stopped and how to resume it). ``experiment``: (table, scale) of ``rcl-train experiment``,
    whose comparison with the paper is written after the run."""
    from .preflight import RunInterrupted

    try:
        return _main(argv, experiment)
    except RunInterrupted as interrupted:
        print(f"rcl-train: {interrupted}", file=sys.stderr)
    except KeyboardInterrupt:
        print("rcl-train: interrupted", file=sys.stderr)
    return 130


def _main(argv: list[str] | None, experiment: tuple[str, str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "experiment":
        return experiment_main(argv[1:])
    parser = build_parser()
    options = vars(parser.parse_args(argv))
    print_config = options.pop("print_config")
    preset, config_file = options.pop("preset", None), options.pop("config", None)
    try:
        config = build_config(preset, config_file, **options)
    except (ValueError, FileNotFoundError, TypeError) as error:
        parser.error(str(error))
    if print_config:
        print(json.dumps(config_to_dict(config), indent=2))
        return 0
    from .tables import format_table
    from .trainer import RunError, run_experiment

    try:
        summary = run_experiment(config)
    except (DataError, RunError, OSError) as error:
        print(f"rcl-train: error: {error}", file=sys.stderr)
        return 2
    if not summary:  # a rank > 0 of a torchrun launch: rank 0 reports
        return 0
    print()
    print(format_table(summary))
    run_dir = summary["environment"]["run_dir"]
    print(f"\nresults: {run_dir}/results.md (and results.json, figures/)")
    if experiment is not None:
        from pathlib import Path

        from .experiments import comparison_markdown
        from .files import write_text_atomically

        comparison = comparison_markdown(*experiment, summary)
        write_text_atomically(Path(run_dir) / "paper_comparison.md", comparison)
        print(f"\n{comparison}\npaper comparison: {run_dir}/paper_comparison.md")
    return 0
