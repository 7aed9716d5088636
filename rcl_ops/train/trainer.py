"""The experiment: pre-train each method's variants from each seed's shared initialisation, proxy-evaluate
them on each task, run the label study, write the table and figures (``run_experiment``).

The stages live beside it: the run folder and resume (run_folder.py), the pre-training loop (pretraining.py),
checkpoints (checkpoints.py), the metrics log (run_log.py), one variant's pre-training and evaluation and the
label study (variant_runs.py), the contrast check (contrast_check.py) and the methods (methods.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import rcl_ops

from . import distributed
from .config import TrainConfig
from .config_checks import label_count
from .contrast_check import CHECK_BATCHES, check_contrast, check_sentence, crop_pair_batches, reference_scores
from .data import make_records, records_multiple, task_input
from .encoder_pretraining import self_supervised_encoder
from .evaluate import ProxySettings, evaluate_naive
from .images import DataError, check_image_sizes, load_split
from .losses import DISTANCE_SCALES
from .methods import METHODS, SL_PROTOCOL, ObjectiveInputs, build_objective, contrast_distance, variants
from .models import ResNet50Encoder, file_sha256, load_encoder_weights, state_sha256
from .preflight import RunError, RunInterrupted, check_machine, resolve_device
from .pretraining import RunContext, initial_network
from .run_folder import check_resumable, claim_run_dir, locate_run
from .run_lock import RunLock
from .run_log import RunLogger
from .seeding import seeded_generator
from .variant_runs import VariantRunner


@contextlib.contextmanager
def torch_settings(threads: int | None, deterministic: bool, device: torch.device):
    """Apply the run's thread count and determinism, and restore torch's previous settings afterwards."""
    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if deterministic:
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])


def run_experiment(config: TrainConfig, echo: Callable[[str], None] | None = print) -> dict:
    """Run the whole protocol for ``config``; returns the summary also written to results.json.

    ``echo`` receives one progress line per finished stage (None: silent).
    """
    config.validate()
    ranks, device = distributed.start(resolve_device(config.device))
    try:
        if ranks.is_main:
            run_dir, saved = locate_run(config)
            # The thread count changes CPU results: a run records the count it used, and a resume keeps it.
            threads = config.threads or (saved or {}).get("threads") or torch.get_num_threads()
            config = dataclasses.replace(config, threads=threads)
            if saved is not None:
                check_resumable(config, saved, run_dir)
        run_dir, config = distributed.broadcast((run_dir, config) if ranks.is_main else None, ranks)
        check_machine(config, device)
        say = (echo or (lambda message: None)) if ranks.is_main else (lambda message: None)
        context = RunContext(device, say, None, config.progress, ranks)
        try:
            with torch_settings(config.threads, config.deterministic, device):
                summary = Experiment(config, context, run_dir).execute()
        except KeyboardInterrupt:  # the run folder's files are whole (atomic writes) and its lock released
            raise RunInterrupted(context.position.interrupted()) from None
        distributed.barrier(ranks)  # every rank done before the group is torn down
        return summary
    finally:
        distributed.stop(ranks)


class Experiment:
    """One run of the protocol: data and noise are prepared once, then for every seed and variant the
    network is pre-trained from the seed's shared initialisation and proxy-evaluated on every task.

    Everything that can fail on the options or the data (images, encoder weights, objectives) is set up
    before the run folder is created, so a run that cannot start leaves nothing behind."""

    def __init__(self, config: TrainConfig, context: RunContext, run_dir: Path):
        self.config, self.run_dir, self.started = config, run_dir, time.perf_counter()
        self.context, self.say, self.ranks = context, context.say, context.ranks
        self.raw = config.modality == "raw"
        self.variants = variants(config)
        self.keys = [v.key for v in self.variants]
        self._prepare_data()
        self._prepare_objectives()
        self.naive = {  # the evaluation is rank 0's
            task: evaluate_naive(self.test, task, config.modality, config.eval_crop, config.grid_images)
            for task in (config.tasks if self.ranks.is_main else [])
        }
        self.density_distance = contrast_distance(config)
        self.crop_pairs = crop_pair_batches(
            self.train,
            config.crop_size,
            config.batch_size,
            max(config.density_batches, CHECK_BATCHES),
            config.split_seed,
            self.raw,
        )
        self.contrast_checks = self._check_contrast()  # before the run folder: a refusal leaves nothing behind
        self.proxy_settings = ProxySettings(
            config.finetune_steps,
            config.finetune_batch_size,
            config.crop_size,
            config.finetune_lr,
            (config.adam_beta1, config.adam_beta2),
            config.adam_eps,
            config.finetune_schedule,
        )
        self.lock: RunLock | None = None

    def _open_run_folder(self) -> None:
        """Claim the run folder (rank 0: created, or taken for --resume, and locked until the run ends), open
        its metrics log, and tell every rank where it is."""
        config, context = self.config, self.context
        if self.ranks.is_main:
            self.run_dir, self.lock = claim_run_dir(self.run_dir, config, self.say)
            logger = RunLogger(self.run_dir, config.tensorboard, resume=config.resume)
            self.context = dataclasses.replace(context, logger=logger)
            self.context.position.run_dir = self.run_dir
        self.run_dir = distributed.broadcast(self.run_dir, self.ranks)
        self.runner = VariantRunner(self, self.proxy_settings)
        self.say(
            f"rcl-train: run folder {self.run_dir}; {len(self.train)} training / {len(self.test)} test images; "
            f"device {context.device}; torch {torch.__version__}"
        )

    def _prepare_data(self) -> None:
        """The split, its checks, the noisy records (with what the methods need: second draws, bursts, each
        task's inputs) and the labelled subsets."""
        config, world_size = self.config, self.ranks.world_size
        images = (config.data_dir, config.test_fraction, config.split_seed, config.max_images)
        train_images, test_images = load_split(*images, config.data_format, config.bundled_images, config.tile_size)
        # the sizes the images have once make_records cuts them to the tasks' multiple
        multiple, burst = records_multiple(self._input_tasks()), any(METHODS[m].burst for m in config.methods)
        crop = "training crop" + (" and the one-pixel shift of a mosaic2mosaic frame" if burst else "")
        check_image_sizes(train_images, config.crop_size + burst, crop, multiple=multiple)
        check_image_sizes(
            test_images,
            8,
            "minimum size of a test image (the 7x7 SSIM window on an image cropped to even size)",
            "remove them from the test images or replace them by larger ones",
            multiple,
        )
        if config.batch_size * world_size > len(train_images):
            raise DataError(
                f"--batch-size {config.batch_size}{f' x {world_size} ranks' if self.ranks.active else ''} needs "
                "at least that many distinct training images (the other "
                f"images of a batch are a crop's negatives), but there are {len(train_images)}; lower --batch-size "
                "or pass a larger --data-dir (--preset quick fits the bundled sample images)"
            )
        if config.num_labelled is not None and config.num_labelled > len(train_images):
            raise DataError(
                f"--num-labelled {config.num_labelled} exceeds the {len(train_images)} training images; "
                "lower --num-labelled"
            )
        self._make_records(train_images, test_images)
        label_order = np.random.default_rng(config.split_seed).permutation(len(self.train)).tolist()
        self.label_order = [self.train[i] for i in label_order]  # nested labelled subsets: its first N
        self.labelled = self.label_order[: config.num_labelled or len(self.train)]
        self.label_levels = sorted({label_count(spec, len(self.train)) for spec in config.labels})
        if self.label_levels and self.label_levels[-1] > len(self.train):
            raise DataError(
                f"--labels {self.label_levels[-1]} exceeds the {len(self.train)} training images; lower it or use all"
            )

    def _input_tasks(self) -> list[str]:
        """The tasks whose inputs the records hold: the evaluated ones and those of supervised pre-training."""
        specs = [v.method for v in self.variants]
        return list(dict.fromkeys([*self.config.tasks, *(s.task for s in specs if s.task is not None)]))

    def _make_records(self, train_images: list, test_images: list) -> None:
        config = self.config
        noise = (config.modality, config.sigma_min, config.sigma_max, config.noise_seed)
        input_tasks = self._input_tasks()
        multiple = records_multiple(input_tasks)
        methods = [METHODS[name] for name in config.methods]
        second_draw, burst = any(s.second_draw for s in methods), any(s.burst for s in methods)
        self.train = make_records(train_images, *noise, second_draw=second_draw, burst=burst, multiple=multiple)
        self.test = make_records(test_images, *noise, second_draw=False, multiple=multiple)
        for record in self.train + self.test:
            record.task_inputs = {
                task: task_input(task, record, config.modality, config.noise_seed) for task in input_tasks
            }

    def _prepare_objectives(self) -> None:
        """The frozen encoders g_e the variants name, and every variant's objective."""
        config, ranks = self.config, self.ranks
        single_process = sorted({v.method.name for v in self.variants if not v.method.distributed})
        if ranks.active and single_process:
            raise RunError(
                f"{' and '.join(single_process)} keep momentum encoders and queues per process: run them without "
                "torchrun"
            )
        self.encoders: dict[str, nn.Module] = {}
        self.encoder_records: dict[str, dict] = {}
        for kind in dict.fromkeys(v.encoder for v in self.variants if v.encoder is not None):
            encoder, self.encoder_records[kind] = self._build_encoder(kind)
            self.encoders[kind] = encoder.to(self.context.device)
        self.objectives = {}
        for v in self.variants:
            inputs = ObjectiveInputs(config, self.encoders.get(v.encoder), ranks.active, ranks.world_size)
            objective = build_objective(v.method.name, inputs)
            if objective is not None:
                self.objectives[v.key] = objective

    def _build_encoder(self, kind: str) -> tuple[nn.Module, dict]:
        """The frozen encoder g_e of ``kind`` and the record of its weights (kind, file name, sha256)."""
        config = self.config
        encoder = ResNet50Encoder(config.encoder_stages, config.encoder_seed)
        record: dict = {"kind": kind, "stages": config.encoder_stages}
        if kind == "random":
            record.update(seed=config.encoder_seed, file=None)
        elif kind == "self":
            generator = seeded_generator(config.encoder_seed, "self-supervised encoder")
            encoder, details = self_supervised_encoder(self.train, config, self.context.device, generator, self.say)
            record.update(seed=config.encoder_seed, **details)
        elif kind == "file":
            try:
                load_encoder_weights(encoder, config.encoder_weights)
            except (OSError, ValueError) as error:
                raise RunError(f"--encoder-weights: {error}") from error
            path = Path(config.encoder_weights)
            record.update(file=path.name, path=str(path.resolve()), file_sha256=file_sha256(path))
        record["state_sha256"] = state_sha256(encoder)
        return encoder, record

    def execute(self) -> dict:
        """Claim the run folder, run every (seed, variant) and the label study, then write the summary, table and
        figures; the folder's lock is released when the run ends, however it ends."""
        config, results, label_results = self.config, [], []
        try:
            self._open_run_folder()
            for seed_index, seed in enumerate(config.seeds):
                initial = initial_network(config, seed)
                initial_state = {key: value.clone() for key, value in initial.state_dict().items()}
                if seed_index == 0 and config.plots and self.ranks.is_main:
                    self.runner.record_reference_densities(initial)
                for key in self.keys:
                    try:
                        results.append(self.runner.run(key, seed, initial_state, first_seed=seed_index == 0))
                    except FloatingPointError as error:
                        raise self._diverged(f"{key}/seed{seed}", error) from error
                label_results += self._label_study(seed, initial_state)
            return self._report(results, label_results) if self.ranks.is_main else {}
        finally:
            if self.context.logger is not None:
                self.context.logger.close()
            if self.lock is not None:
                self.lock.release()

    def _label_study(self, seed: int, initial_state: dict) -> list[dict]:
        """SL and RCL+SL (each RCL variant) at every label count. Rank 0's, like the proxy evaluation (the
        others wait at the next seed's pre-training)."""
        rcl_keys = [v.key for v in self.variants if v.method.family == "rcl"]
        protocols = [SL_PROTOCOL, *rcl_keys] if self.ranks.is_main else []
        found = []
        for protocol in protocols:
            for count in self.label_levels:
                try:
                    found.append(self.runner.label_run(protocol, seed, count, initial_state))
                except FloatingPointError as error:
                    raise self._diverged(f"{protocol}/seed{seed}/{count} labels", error) from error
        return found

    def _report(self, results: list[dict], label_results: list[dict]) -> dict:
        """results.json, results.md and the figures; returns the summary."""
        from . import report

        config = self.config
        self.context.position.at("writing the report")
        environment = self._environment()
        environment["contrast_checks"] = {
            distance: {str(seed): check for (d, seed), check in self.contrast_checks.items() if d == distance}
            for distance in dict.fromkeys(d for d, _ in self.contrast_checks)
        }
        summary = report.summarise(config, results, self.naive, environment, label_results)
        report.write_summary(self.run_dir, summary)
        if config.plots and summary["label_efficiency"]:
            report.plot_label_efficiency(self.run_dir / "figures" / "label_efficiency.png", summary["label_efficiency"])
        if config.plots:
            figures, runner = self.run_dir / "figures", self.runner
            report.plot_densities(figures / "residual_distance_density.png", runner.densities, self.density_distance)
            for task in config.tasks:
                report.plot_samples(figures / f"samples_{task}.png", runner.examples[task], task)
        return summary

    def _diverged(self, what: str, error: FloatingPointError) -> RunError:
        return RunError(
            f"{what}: {error}. The run folder {self.run_dir} keeps what finished, but a --resume would diverge "
            "again at the same step: start a new run (another --run-name) with the changed option"
        )

    def _check_contrast(self) -> dict[tuple[str, int], dict]:
        """``check_contrast`` of every seed's initial network for each distance of the run's variants with a
        contrastive term, keyed (distance, seed); RunError when the contrastive term does not reward
        denoising, unless --ignore-contrast-check."""
        config, checks = self.config, {}
        first_key = {}  # distance -> the first variant that contrasts with it (its objective has the settings)
        for v in self.variants:
            if v.method.distance is not None:
                first_key.setdefault(v.method.distance, v.key)
        for distance, key in first_key.items() if self.crop_pairs else ():
            contrastive = self.objectives[key].contrastive
            options = (
                self.crop_pairs,
                lambda q, k, c=contrastive: c.distance_fn(q, k, **c.distance_kwargs),
                DISTANCE_SCALES[config.distance_scale],
                contrastive.temperature,
                contrastive.symmetric,
                self.raw,
                self.context.device,
            )
            references = reference_scores(*options)  # the true noise and the blur: the same for every seed
            for seed in config.seeds:
                with torch.random.fork_rng(devices=[]):  # the run draws each seed's network again later
                    model = initial_network(config, seed)
                checks[(distance, seed)] = check_contrast(model, *options, references=references)
        self._refuse_failed_checks(checks)
        return checks

    def _refuse_failed_checks(self, checks: dict[tuple[str, int], dict]) -> None:
        config = self.config
        failing = [
            f"{d.upper()} seed {seed}: {check_sentence(check)}"
            for (d, seed), check in checks.items()
            if not check["rewards_denoising"]
        ]
        if failing and not config.ignore_contrast_check:
            raise RunError(
                "the contrastive term does not reward denoising under these settings, so RCL pre-training would "
                "optimise the wrong thing: " + "; ".join(failing) + ". Change --distance-scale / --temperature "
                "(defaults: 8bit and per distance)"
                + (" or --unet-output (default residual)" if config.unet_output == "image" else "")
                + ", or pass --ignore-contrast-check to run anyway"
            )
        for line in failing:
            self.say(f"WARNING (--ignore-contrast-check): {line}")

    def _environment(self) -> dict:
        return {
            "run_dir": str(self.run_dir),
            "device": str(self.context.device),
            "torch": torch.__version__,
            "rcl_ops": rcl_ops.__version__,
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
            "distance_backends_available": rcl_ops.available_backends(self.context.device),
            "encoders": self.encoder_records,
            "num_train_images": len(self.train),
            "num_test_images": len(self.test),
            "num_labelled": len(self.labelled),
            "train_images": [r.name for r in self.train],
            "test_images": [r.name for r in self.test],
            "wall_seconds": time.perf_counter() - self.started,
            "command": " ".join(sys.argv),
        }
