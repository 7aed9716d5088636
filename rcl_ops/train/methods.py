"""The registry of pre-training methods: one ``MethodSpec`` per method in ``METHODS``.

A method is what ``--methods`` names ('rcl-emd', 'n2n', 'sl-denoise', ...). What is pre-trained is a
*variant*: a method with, for a method with the consistency term on RGB data, its frozen encoder g_e
(``Variant``, named 'rcl-emd+random' in run folders and results). The pre-training loop, the experiment
and the report read everything they need about a method from its spec; adding a method is one entry here
plus its objective class (an ``Objective``, losses.py) and its tests (trainer README, "How to add a
pre-training method").
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .baselines import MoCoObjective, PixelContrastObjective, ResNetFCN
from .data import MODALITIES, TASK_TITLES, TASKS, canonical_task
from .losses import (
    DISTANCE_SCALES,
    FeatureConsistencyLoss,
    Mosaic2MosaicObjective,
    Noise2NoiseObjective,
    Noise2SelfObjective,
    Objective,
    RawConsistencyLoss,
    RCLObjective,
    SupervisedObjective,
    contrastive_loss,
)
from .seeding import derive_seed

if TYPE_CHECKING:
    from .config import TrainConfig

DISTANCES = ("emd", "mmd", "bd")
# The InfoNCE temperature of each distance when --temperature is not given. EMD is in intensity units (8-bit
# scale by default), MMD and BD are unitless and ~100x smaller for the same change of noise level: at 0.1 the
# true noise scored a higher L_contrast than the image content of an untrained image-predicting U-Net's
# residuals for MMD and BD on the quick and small presets' data, at 0.01 a lower one (README, "Which
# settings reward denoising").
DEFAULT_TEMPERATURES = {"emd": 0.1, "mmd": 0.01, "bd": 0.01}
ENCODER_KINDS = ("random", "self", "file")
ENCODER_TITLES = {"random": "random", "self": "self-pre-trained", "file": "weights file"}


@dataclass(frozen=True)
class ObjectiveInputs:
    """What an objective factory may use: the options, the frozen encoder g_e of the variant (None without
    one) and, under torchrun, ``gather_distributed`` (negatives from every rank) of ``world_size`` ranks."""

    config: TrainConfig
    encoder: nn.Module | None = None
    gather_distributed: bool = False
    world_size: int = 1


@dataclass(frozen=True)
class MethodSpec:
    """One pre-training method.

    objective: the factory of its ``Objective`` (None: nothing is pre-trained, the network is evaluated as
    initialised). family: 'rcl' (RCL and its controls: ``RCLObjective``; these also run RCL+SL in the label
    study), 'supervised' (clean targets) or 'self-supervised' (the baselines). distance: the distance of a
    contrastive term (None without one). consistency: has the consistency term with g_e, so on RGB data it
    runs once per --encoders entry. task: the task a supervised pre-training learns. second_draw / burst: the
    data it needs besides one noisy draw per image (a second draw: noise2noise; a burst of shifted mosaics:
    mosaic2mosaic). modalities: where it is defined. distributed: whether it may run under torchrun.
    initial_model: its own initial network (config, seed) -> nn.Module instead of the seed's shared one.
    per_task: a name that stands for supervised pre-training on each evaluated task (the Oracle).
    """

    name: str
    title: str
    objective: Callable[[MethodSpec, ObjectiveInputs], Objective] | None
    family: str = "self-supervised"
    distance: str | None = None
    consistency: bool = False
    task: str | None = None
    second_draw: bool = False
    burst: bool = False
    modalities: tuple[str, ...] = MODALITIES
    distributed: bool = True
    initial_model: Callable[[TrainConfig, int], nn.Module] | None = None
    per_task: bool = False
    check_options: Callable[[TrainConfig], None] | None = None

    @property
    def is_rcl(self) -> bool:
        """RCL itself, with both terms (not one of its controls)."""
        return self.family == "rcl" and self.consistency and self.distance is not None


def contrast_distance(config: TrainConfig) -> str:
    """The distance of the run's first method with a contrastive term (--distance if none): the one of the
    Fig. 2 densities and of the consistency-only control's diagnostics."""
    return next(filter(None, (METHODS[name].distance for name in config.methods)), config.distance)


def temperature_of(config: TrainConfig, distance: str) -> float:
    """--temperature, or the distance's default (``DEFAULT_TEMPERATURES``)."""
    return DEFAULT_TEMPERATURES[distance] if config.temperature is None else config.temperature


def rcl_objective(spec: MethodSpec, inputs: ObjectiveInputs, alpha_zero: bool = False) -> RCLObjective:
    """RCL (Eq. 10) or one of its controls: without the consistency term (``spec.consistency`` False) or
    with alpha 0 (``alpha_zero``; its distance, for the diagnostics, is the run's first contrastive one)."""
    config, raw = inputs.config, inputs.config.modality == "raw"
    distance = spec.distance or contrast_distance(config)
    contrastive = contrastive_loss(
        distance,
        temperature_of(config, distance),
        config.symmetric,
        config.distance_backend,
        config.emd_quantiles,
        gather_distributed=inputs.gather_distributed,
        reduction=config.contrast_reduction,
    )
    if not spec.consistency:
        consistency = None
    elif raw:
        consistency = RawConsistencyLoss(config.raw_max_shift, config.consistency_reduction)
    else:
        consistency = FeatureConsistencyLoss(inputs.encoder, config.consistency_reduction)
    # A sum over this rank's queries, averaged over ranks by DDP, is 1/W of the sum over the global batch
    # that one process would take: alpha makes up for it.
    summed_over_ranks = inputs.gather_distributed and config.contrast_reduction == "sum"
    alpha = 0.0 if alpha_zero else config.alpha * (inputs.world_size if summed_over_ranks else 1)
    weight = 0.0 if consistency is None else config.consistency_weight
    return RCLObjective(contrastive, consistency, alpha, weight, raw, DISTANCE_SCALES[config.distance_scale])


def _resnet_fcn(config: TrainConfig, seed: int) -> nn.Module:
    """MoCo's network: a ResNet-FCN (--width, --depth stages) initialised from the seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init", "resnet-fcn"))
        return ResNetFCN(config.width or 32, max(1, config.depth or 3), config.modality == "raw")


def _check_n2s_grid(config: TrainConfig) -> None:
    low = 3 if config.modality == "raw" else 2  # RAW masks same-colour neighbours two pixels away
    if not low <= config.n2s_grid <= config.crop_size:
        raise ValueError(
            f"--n2s-grid must be in [{low}, --crop-size {config.crop_size}] for {config.modality} data "
            f"(every lattice phase must fall inside a crop), got {config.n2s_grid}"
        )


def _raw(inputs: ObjectiveInputs) -> bool:
    return inputs.config.modality == "raw"


def _registry() -> dict[str, MethodSpec]:
    rcl = functools.partial(MethodSpec, objective=rcl_objective, family="rcl")
    specs = [
        *(rcl(f"rcl-{d}", f"RCL-{d.upper()}", distance=d, consistency=True) for d in DISTANCES),
        # the RCL controls: L_consistency alone (alpha 0), L_contrast alone
        rcl(
            "consistency",
            "Consistency only (alpha 0)",
            objective=functools.partial(rcl_objective, alpha_zero=True),
            consistency=True,
        ),  # fmt: skip
        *(rcl(f"contrast-{d}", f"Contrastive only ({d.upper()})", distance=d) for d in DISTANCES),
        MethodSpec("n2n", "N2N", lambda spec, inputs: Noise2NoiseObjective(_raw(inputs)), second_draw=True),
        MethodSpec(
            "n2s",
            "N2S",
            lambda spec, inputs: Noise2SelfObjective(inputs.config.n2s_grid, _raw(inputs)),
            check_options=_check_n2s_grid,
        ),
        MethodSpec("m2m", "M2M", lambda spec, inputs: Mosaic2MosaicObjective(), burst=True, modalities=("raw",)),
        MethodSpec(
            "moco",
            "MoCo (ResNet-FCN)",
            lambda spec, inputs: MoCoObjective(),
            modalities=("rgb",),
            distributed=False,
            initial_model=_resnet_fcn,
        ),
        MethodSpec(
            "pixcl",
            "PixCL (VADeR/PixContrast-style)",
            lambda spec, inputs: PixelContrastObjective(),
            modalities=("rgb",),
            distributed=False,
        ),
        MethodSpec("oracle", "Oracle", None, family="supervised", per_task=True),
        MethodSpec("random", "Random init", None),
        *(
            MethodSpec(
                f"sl-{task}",
                f"SL ({TASK_TITLES[task]})",
                lambda spec, inputs: SupervisedObjective(spec.task),
                family="supervised",
                task=task,
            )
            for task in TASKS
        ),
    ]
    return {spec.name: spec for spec in specs}


METHODS: dict[str, MethodSpec] = _registry()
# Names that stand for a method with --distance: 'rcl' -> 'rcl-<distance>', 'contrast' -> 'contrast-<distance>'.
DISTANCE_ALIASES = ("rcl", "contrast")
SL_PROTOCOL = "sl"  # the label study's baseline: supervised training from the seed's initialisation (not a method)
SUPERVISED_PREFIX = "sl-"  # 'sl-<task>': its task by any of the task's names ('sl-denoise' on RAW is 'sl-jdd')


def canonical_method(name: str, default_distance: str, modality: str = "rgb") -> str:
    """The registry name of what --methods names: 'rcl' -> 'rcl-<default_distance>', 'contrast' ->
    'contrast-<default_distance>'; 'sl-<task>' with the modality's task name ('sl-denoise' on RAW is
    'sl-jdd'); 'rcl-emd', 'consistency', 'n2n', ... unchanged; ValueError otherwise (also for a method the
    modality lacks)."""
    name = name.lower()
    if name in DISTANCE_ALIASES:
        name = f"{name}-{default_distance}"
    if name.startswith(SUPERVISED_PREFIX):
        name = SUPERVISED_PREFIX + canonical_task(name[len(SUPERVISED_PREFIX) :], modality)
    if name not in METHODS:
        listed = [*DISTANCE_ALIASES, *(n for n, spec in METHODS.items() if spec.task is None)]
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(listed)}, {SUPERVISED_PREFIX}<task>")
    if modality not in METHODS[name].modalities:
        raise ValueError(f"method {name!r} is not defined for --modality {modality}")
    return name


@dataclass(frozen=True)
class Variant:
    """What one pre-training trains: a method and, for a method with the consistency term on RGB data, its
    encoder kind (``ENCODER_KINDS``). ``key`` names it in run folders and results: 'rcl-emd+random'."""

    method: MethodSpec
    encoder: str | None = None

    @property
    def key(self) -> str:
        return self.method.name + (f"+{self.encoder}" if self.encoder else "")

    @property
    def title(self) -> str:
        """'RCL-EMD (g_e: random)', 'N2N', 'SL (Denoising)'."""
        encoder = f" (g_e: {ENCODER_TITLES.get(self.encoder, self.encoder)})" if self.encoder else ""
        return self.method.title + encoder


def variant(key: str) -> Variant:
    """The variant a key names: 'rcl-emd+random' -> (RCL-EMD, 'random'); KeyError for an unknown method."""
    name, _, encoder = key.partition("+")
    return Variant(METHODS[name], encoder or None)


def spec_of(key: str) -> MethodSpec | None:
    """The method of a variant key ('rcl-emd+random' -> RCL-EMD's spec); None for a name outside the registry
    (the report's 'input' row, a result written by another version)."""
    return METHODS.get(key.partition("+")[0])


def method_title(key: str) -> str:
    """Display name of a variant key or method name ('rcl-emd+random' -> 'RCL-EMD (g_e: random)'); the key
    itself in capitals for a name outside the registry."""
    return variant(key).title if spec_of(key) is not None else key.upper()


def protocol_title(protocol: str) -> str:
    """A label-study protocol's title: 'SL', or 'RCL+SL [<the RCL variant's title>]'."""
    return "SL" if protocol == SL_PROTOCOL else f"RCL+SL [{method_title(protocol)}]"


def supervised_method(task: str) -> MethodSpec:
    """Supervised pre-training on ``task``: what the Oracle of ``task`` is."""
    return next(spec for spec in METHODS.values() if spec.task == task)


def variants(config: TrainConfig) -> list[Variant]:
    """What is pre-trained, in order: each method, each method with the consistency term on RGB data once
    per encoder ('rcl-emd+random', 'rcl-emd+file', ...), and the Oracle as supervised pre-training on each
    task ('sl-denoise', 'sl-sr2', ...: each evaluated on its own task, see ``TrainConfig.evaluation_tasks``)."""
    found: dict[str, Variant] = {}
    for name in config.methods:
        spec = METHODS[name]
        if spec.consistency and config.modality == "rgb":
            chosen = [Variant(spec, encoder) for encoder in config.encoders]
        elif spec.per_task:
            chosen = [Variant(supervised_method(task)) for task in config.tasks]
        else:
            chosen = [Variant(spec)]
        found.update((v.key, v) for v in chosen if v.key not in found)
    return list(found.values())


def controls_of(key: str) -> dict[str, str]:
    """The controls of an RCL variant 'rcl-<d>[+<encoder>]': {'consistency': 'consistency[+<encoder>]' (alpha
    0: the consistency loss alone, same encoder), 'contrast': 'contrast-<d>' (the contrastive term alone)};
    empty for any other variant."""
    v = variant(key)
    if not v.method.is_rcl:
        return {}
    contrast_only = next(
        s for s in METHODS.values() if s.family == "rcl" and not s.consistency and s.distance == v.method.distance
    )
    alpha_zero = next(s for s in METHODS.values() if s.family == "rcl" and s.consistency and s.distance is None)
    return {"consistency": Variant(alpha_zero, v.encoder).key, "contrast": contrast_only.name}


def build_objective(name: str, inputs: ObjectiveInputs) -> Objective | None:
    """The pre-training objective of method ``name`` (a registry name, e.g. 'rcl-emd', 'n2s'); None for a
    method that pre-trains nothing."""
    spec = METHODS[name]
    return None if spec.objective is None else spec.objective(spec, inputs)
