"""One variant's pre-training and evaluation for one seed (``VariantRunner.run``), and one cell of the label
study (``VariantRunner.label_run``); each reuses a finished result on --resume."""

from __future__ import annotations

import dataclasses
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from . import distributed
from .checkpoints import load_checkpoint, save_checkpoint
from .contrast_check import check_sentence, distance_matrices_of
from .data import DENOISING_TASK, CropSampler
from .evaluate import ProxySettings, TestScores, evaluate_restorer, proxy_evaluate, train_supervised
from .files import DamagedFileError, atomic_path, read_json, write_json_atomically
from .losses import DISTANCE_SCALES, fraction_positive, residual_distance_gaps
from .methods import SL_PROTOCOL, variant
from .models import configured_model
from .pretraining import pretrain
from .seeding import seeded_generator

if TYPE_CHECKING:
    from .trainer import Experiment


def scores_dict(scores: TestScores) -> dict:
    return {
        "psnr": scores.mean_psnr,
        "ssim": scores.mean_ssim,
        "psnr_per_image": scores.psnr,
        "ssim_per_image": scores.ssim,
    }


class VariantRunner:
    """Pre-trains and evaluates the variants of ``experiment`` (its data, objectives, checks and run folder),
    collecting the first seed's figure data: sample outputs per task (``examples``) and Fig. 2's distance
    gaps per variant (``densities``)."""

    def __init__(self, experiment: Experiment, proxy_settings: ProxySettings):
        self.experiment, self.config, self.context = experiment, experiment.config, experiment.context
        self.run_dir, self.proxy_settings = experiment.run_dir, proxy_settings
        self.examples: dict[str, dict[str, list]] = {
            task: {"Input": naive.examples} for task, naive in experiment.naive.items()
        }
        self.densities: dict[str, np.ndarray] = {}

    def record_reference_densities(self, initial: nn.Module) -> None:
        """Fig. 2's gaps of the initial network and of the true noise."""
        initial.to(self.context.device)
        self.densities["init"] = self.gaps(initial)
        self.densities["noise"] = self.gaps(None)

    def gaps(self, model: nn.Module | None) -> np.ndarray:
        """Fig. 2's gaps d(r(x_i), r(x'_j)) - d(r(x_i), r(x'_i)), j != i, on the fixed crop pairs."""
        config, experiment = self.config, self.experiment
        matrices = distance_matrices_of(
            model,
            experiment.crop_pairs[: config.density_batches],
            experiment.density_distance,
            DISTANCE_SCALES[config.distance_scale],
            config.distance_backend,
            experiment.raw,
            self.context.device,
        )
        return torch.cat([residual_distance_gaps(d) for d in matrices]).numpy() if matrices else np.empty(0)

    def run(self, key: str, seed: int, initial_state: dict, first_seed: bool) -> dict:
        """Pre-train variant ``key`` from ``initial_state`` and proxy-evaluate it (or reuse a finished result)."""
        config, ranks = self.config, self.context.ranks
        result_path = self.run_dir / "results" / f"{key}_seed{seed}.json"
        checkpoint_dir = self.run_dir / "checkpoints" / key / f"seed{seed}"
        samples_path = checkpoint_dir / "samples.npz"
        reused = None
        if ranks.is_main and config.resume and result_path.exists() and (not first_seed or samples_path.exists()):
            try:
                reused = self._reuse_result(key, result_path, samples_path if first_seed else None, seed)
            except DamagedFileError as error:
                self.context.say(f"  {key}/seed{seed}: {error}; computing this result again")
        if distributed.broadcast(reused is not None, ranks):
            return reused
        model = self._initial_model(key, seed, initial_state).to(self.context.device)
        result = self._pretrain(model, key, seed, checkpoint_dir)
        if not ranks.is_main:
            return result  # the run folder and the proxy evaluation are rank 0's
        save_checkpoint(checkpoint_dir / "pretrained.safetensors", model, metadata={"method": key, "seed": seed})
        samples = self._evaluate(model, key, seed, result, first_seed)
        if first_seed:
            with atomic_path(samples_path) as temporary:
                np.savez_compressed(temporary, **samples)
        for phase, field in (("proxy", "tasks"), ("as-is", "as_is")):
            if result[field]:
                scores_row = {f"{t}_{k}": v[k] for t, v in result[field].items() for k in ("psnr", "ssim")}
                self.context.log(key, seed, phase, 0, scores_row)
        write_json_atomically(result_path, result)  # last: its presence marks the (variant, seed) finished
        return result

    def _initial_model(self, key: str, seed: int, initial_state: dict) -> nn.Module:
        """The network variant ``key`` starts from: its method's own (``MethodSpec.initial_model``) or the
        seed's shared initialisation of --model."""
        spec = variant(key).method
        if spec.initial_model is not None:
            return spec.initial_model(self.config, seed)
        model = configured_model(self.config)
        model.load_state_dict(initial_state)
        return model

    def _pretrain(self, model: nn.Module, key: str, seed: int, checkpoint_dir: Path) -> dict:
        """The result so far: the contrast check that cleared the variant, and its pre-training record."""
        config, experiment, tag = self.config, self.experiment, f"{key}/seed{seed}"
        v = variant(key)
        result: dict = {"method": key, "seed": seed}
        if v.encoder is not None:
            result["encoder"] = experiment.encoder_records[v.encoder]
        if (v.method.distance, seed) in experiment.contrast_checks and config.pretrain_steps > 0:
            result["contrast_check"] = check = experiment.contrast_checks[(v.method.distance, seed)]
            self.context.say(f"  {tag}: {check_sentence(check)}")
        if key in experiment.objectives and config.pretrain_steps > 0:
            generator = seeded_generator(seed, "pretrain")
            sampler = CropSampler(
                experiment.train, config.crop_size, generator, experiment.raw, task=v.method.task, burst=v.method.burst
            )
            objective = experiment.objectives[key].to(self.context.device)
            result["pretrain"] = pretrain(model, objective, sampler, config, self.context, checkpoint_dir, key, seed)
            if self.context.ranks.is_main:
                self.context.say(
                    f"  {tag}: pre-trained {config.pretrain_steps} steps in {result['pretrain']['seconds']:.1f} s, "
                    f"final loss {result['pretrain']['final_loss']:.4g}"
                )
        return result

    def _evaluate(self, model: nn.Module, key: str, seed: int, result: dict, first_seed: bool) -> dict:
        """Fig. 2's gaps (first seed), the scores as pre-trained and after fine-tuning a fresh head on each
        task, into ``result``; returns the first seed's figure data to save."""
        config = self.config
        tasks = config.evaluation_tasks(key)
        samples: dict[str, np.ndarray] = {}
        if first_seed and config.plots and "pretrain" in result:
            gaps = self.gaps(model)
            self.densities[key] = samples["density"] = gaps
            result["density"] = {
                "distance": self.experiment.density_distance,
                "positive_closer_init": fraction_positive(torch.from_numpy(self.densities["init"])),
                "positive_closer_after": fraction_positive(torch.from_numpy(gaps)),
                "positive_closer_true_noise": fraction_positive(torch.from_numpy(self.densities["noise"])),
            }
        self.context.position.at("the evaluation of", f"{key}/seed{seed}")
        model.eval()  # the network as pre-trained, no layer replaced: the "0 labels" row
        try:
            result["as_is"] = {
                task: scores_dict(
                    evaluate_restorer(model, self.experiment.test, task, self.context.device, config.eval_crop)
                )
                for task in tasks
            }
        except FloatingPointError as error:  # finite weights, but so large that the output overflows
            objective = self.experiment.objectives.get(key)
            advice = f"; try {objective.divergence_advice}" if objective is not None else ""
            raise FloatingPointError(f"pre-training diverged: {error}{advice}") from error
        result["tasks"] = {}
        for task in tasks if config.finetune_steps > 0 else ():
            result["tasks"][task] = self._finetune(model, key, seed, task, first_seed, samples)
        return samples

    def _finetune(self, model: nn.Module, key: str, seed: int, task: str, first_seed: bool, samples: dict) -> dict:
        """The proxy evaluation on ``task``: a fresh head fine-tuned on the labelled images, then scored."""
        config, context, tag = self.config, self.context, f"{key}/seed{seed}"
        context.position.at(f"the fine-tuning on {task} of", tag)

        def log_finetune(step: int, loss: float) -> None:
            if step % config.log_every == 0 or step == config.finetune_steps:
                context.log(key, seed, f"finetune-{task}", step, {"l1": loss})

        tuned, scores, seconds = proxy_evaluate(
            model,
            task,
            self.experiment.labelled,
            self.experiment.test,
            self.proxy_settings,
            seeded_generator(seed, "finetune", task),
            context.device,
            self.experiment.raw,
            eval_crop=config.eval_crop,
            keep_examples=config.grid_images if first_seed else 0,
            on_step=log_finetune,
            progress=context.bar(f"fine-tune {tag} {task}"),
        )
        metadata = {"method": key, "seed": seed, "task": task}
        save_checkpoint(self.run_dir / "checkpoints" / key / f"seed{seed}" / f"finetuned_{task}.safetensors",
                        tuned, metadata=metadata)  # fmt: skip
        if first_seed:
            self.examples[task][key] = scores.examples
            for index, (_, output, _) in enumerate(scores.examples):
                samples[f"{task}.{index}"] = output.numpy()
        context.say(
            f"  {tag}: {task} PSNR {scores.mean_psnr:.2f} dB, SSIM {scores.mean_ssim:.4f} "
            f"(fine-tuned head in {seconds:.1f} s)"
        )
        return {**scores_dict(scores), "finetune_seconds": seconds}

    def _reuse_result(self, key: str, result_path: Path, samples_path: Path | None, seed: int) -> dict:
        """A finished (variant, seed)'s saved result, and for the first seed its figure data from
        ``samples_path``; DamagedFileError naming a file that cannot be read."""
        result = read_json(result_path, non_finite=True)
        tasks = self.config.evaluation_tasks(key)
        proxy_tasks = tasks if self.config.finetune_steps > 0 else []
        if (
            not isinstance(result, dict)
            or not set(proxy_tasks) <= set(result.get("tasks", {}))
            or not set(tasks) <= set(result.get("as_is", {}))
        ):
            raise DamagedFileError(result_path, f"it lacks the scores of the tasks {tasks}")
        if samples_path is not None:
            _load_samples(samples_path, key, self.examples, self.densities)
        self.context.say(f"  {key}/seed{seed}: reused finished result")
        return result

    def label_run(self, protocol: str, seed: int, count: int, initial_state: dict) -> dict:
        """SL (``protocol`` 'sl': from the seed's initial weights) or RCL+SL (an RCL variant key: from its
        pre-trained weights) on the first ``count`` labelled images, every layer trained; denoising scores
        on the test images (or a finished result reused)."""
        config, experiment, tag = self.config, self.experiment, f"{protocol}/seed{seed}/{count} labels"
        result_path = self.run_dir / "results" / "labels" / f"{protocol}_n{count}_seed{seed}.json"
        if config.resume and result_path.exists():
            try:
                result = read_json(result_path, non_finite=True)
                if isinstance(result, dict) and "psnr_per_image" in result:
                    return result
                raise DamagedFileError(result_path, "it lacks the per-image scores")
            except DamagedFileError as error:
                self.context.say(f"  {tag}: {error}; computing this result again")
        self.context.position.at("the label study,", tag)
        model = configured_model(config)
        model.load_state_dict(initial_state)
        if protocol != SL_PROTOCOL:
            load_checkpoint(self.run_dir / "checkpoints" / protocol / f"seed{seed}" / "pretrained.safetensors", model)
        settings = dataclasses.replace(self.proxy_settings, steps=config.sl_steps, lr=config.sl_lr)

        def log_step(step: int, loss: float) -> None:
            if step % config.log_every == 0 or step == config.sl_steps:
                self.context.log(protocol, seed, f"sl-{count}", step, {"l1": loss})

        generator = seeded_generator(seed, "supervised", str(count))
        task, device = DENOISING_TASK[config.modality], self.context.device
        labelled = experiment.label_order[:count]
        seconds = train_supervised(model, task, labelled, settings, generator, device, experiment.raw, log_step)
        scores = evaluate_restorer(model, experiment.test, task, device, config.eval_crop)
        result = {"protocol": protocol, "seed": seed, "labels": count, "seconds": seconds, **scores_dict(scores)}
        self.context.say(
            f"  {tag}: {task} PSNR {scores.mean_psnr:.2f} dB, SSIM {scores.mean_ssim:.4f} ({seconds:.1f} s)"
        )
        write_json_atomically(result_path, result)
        return result


def _load_samples(path: Path, key: str, examples: dict, densities: dict) -> None:
    """Restore a finished run's Fig. 2 gaps and sample outputs (for --resume); DamagedFileError naming
    ``path`` (and nothing restored) when it cannot be read."""
    try:
        with np.load(path) as archive:
            stored = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise DamagedFileError(path, f"{type(error).__name__}: {error}") from error
    if "density" in stored:
        densities[key] = stored["density"]
    for task, task_examples in examples.items():
        reference = task_examples.get("Input", [])
        outputs = []
        for index, (inputs, _, target) in enumerate(reference):
            key = f"{task}.{index}"
            if key in stored:
                outputs.append((inputs, torch.from_numpy(stored[key]), target))
        if outputs:
            task_examples[key] = outputs
