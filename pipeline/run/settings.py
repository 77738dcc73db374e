"""The settings of every verb: one typed model per verb, all defined here, from sections.

A section is a frozen dataclass that lives beside its concept and checks itself when it is
built (pipeline/fields.py); this module assembles them into each verb's model:

    input        InputSettings        io/data.py           --data, --image-column, --max-pixels, --min-size
    model        ModelSettings        score/models.py      --model, --allow-pickle, --variant, --device, ...
    output       OutputSettings       io/store.py          --out, --overwrite
    scorer       ScorerSettings       score/volume.py      --solver, --steps, --probes, ...
    cache        CacheSettings        score/cache.py       --cache-dir, --no-cache, --shard-size
    judge        JudgeSettings        decide/scores.py     --score, --precision-target, --max-passes
    flag         FlagSettings         decide/flagging.py   --reference, --flag-fpr, --flag-quantile, ...
    dedup        DedupSettings        decide/clusters.py   --embedder, --dup-threshold, --against, ...
    remediation  RemediationSettings  decide/remediate.py  --action, --augment-tries, --accept-band, ...
    guard        GuardSettings        decide/remediate.py  --max-loss-fraction
    decode       DecodeSettings       io/data.py           --image-size, --batch-size, --device (no model)
    train        TrainSettings        tools/train.py       --sample-size, --channels, --steps, ...
    sample       SampleSettings       score/sampling.py    --generations, --sample-steps, --sample-seed
    copies       CopySettings         decide/copies.py     --copy-ratio, --from, --reference

    ScoreSettings     memclean score           input, model, output, scorer, judge
    RunSettings       memclean clean, flow     ScoreSettings + cache, flag, dedup, remediation, guard
    DedupRunSettings  memclean dedup           input, output, decode, dedup, guard
    TrainRunSettings  memclean train           input, output, train
    VerifySettings    memclean verify, flow    input, model, output, sample, copies, dedup, cache
    FlowSettings      the flow's own           task_runner, dask_address, dask_workers

Every verb's options (and the flow `clean`'s parameters) are derived from its model
(fields.options). What involves two sections is checked here, so a run's settings are whole and
valid before its first image is decoded, and `flat()` is what every output records.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from pipeline.decide.clusters import DedupSettings
from pipeline.decide.copies import CopySettings
from pipeline.decide.flagging import FlagSettings
from pipeline.decide.scores import JudgeSettings
from pipeline.decide.remediate import GuardSettings, RemediationSettings
from pipeline.fields import build, check_choices, flatten, section, setting, unknown
from pipeline.io.data import DecodeSettings, InputSettings
from pipeline.io.store import OutputSettings
from pipeline.run.gpus import parse_devices
from pipeline.score.cache import CacheSettings
from pipeline.score.models import ModelSettings
from pipeline.score.sampling import SampleSettings
from pipeline.score.volume import ScorerSettings
from pipeline.tools.train import TrainSettings


class SettingsMixin:
    """flat() and from_flat() for a settings model made of sections."""

    def flat(self) -> dict[str, Any]:
        """Every setting by its flat name, resolved (what every output records)."""
        return flatten(self)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]):
        """Build (and so validate) from flat names; an unknown name is an error, not ignored."""
        extra = unknown(cls, values)
        if extra:
            raise ValueError(f"unknown settings {extra}")
        return build(cls, values)


@dataclass(frozen=True)
class ModelRun(SettingsMixin):
    """What every verb with a model starts from: its images, the model, where the output goes."""

    input: InputSettings = section()
    model: ModelSettings = section()
    output: OutputSettings = section()


@dataclass(frozen=True)
class ScoreSettings(ModelRun):
    """`memclean score`: images in, one score row per image out."""

    scorer: ScorerSettings = section(ScorerSettings)
    judge: JudgeSettings = section(JudgeSettings)


@dataclass(frozen=True)
class RunSettings(ScoreSettings):
    """`memclean clean` and the flow `clean`: the whole pipeline (a score's settings and more)."""

    cache: CacheSettings = section(CacheSettings)
    flag: FlagSettings = section(FlagSettings)
    dedup: DedupSettings = section(DedupSettings)
    remediation: RemediationSettings = section(RemediationSettings)
    guard: GuardSettings = section(GuardSettings)

    def __post_init__(self) -> None:
        if self.dedup.against is not None and not self.remediation.dedups:
            raise ValueError(f"--against compares new images with an earlier output's duplicates, which only "
                             f"--action auto or dedup does; this run has --action {self.remediation.action}")


@dataclass(frozen=True)
class DedupRunSettings(SettingsMixin):
    """`memclean dedup`: images in, duplicate clusters and a deduplicated dataset out (no model)."""

    input: InputSettings = section()
    output: OutputSettings = section()
    decode: DecodeSettings = section(DecodeSettings)
    dedup: DedupSettings = section(DedupSettings)
    guard: GuardSettings = section(GuardSettings)

    def __post_init__(self) -> None:
        if self.dedup.embedder == "unet":
            raise ValueError("--embedder unet uses a diffusion model's features: memclean dedup has no model "
                             "(use pixel or torchscript:PATH, or memclean clean --model)")


@dataclass(frozen=True)
class VerifySettings(ModelRun):
    """`memclean verify`: a model and its training images in, the generations that copy them out."""

    sample: SampleSettings = section(SampleSettings)
    copies: CopySettings = section(CopySettings)
    dedup: DedupSettings = section(DedupSettings)
    cache: CacheSettings = section(CacheSettings)

    def __post_init__(self) -> None:
        if self.dedup.against is not None:
            raise ValueError("--against drops new images that duplicate an earlier output's; memclean verify drops "
                             "nothing (--from names the clean output whose flags it checks)")


@dataclass(frozen=True)
class TrainRunSettings(SettingsMixin):
    """`memclean train`: images in, a small DDPM checkpoint (save_pretrained layout) out."""

    input: InputSettings = section()
    output: OutputSettings = section()
    train: TrainSettings = section(TrainSettings)


@dataclass(frozen=True)
class FlowSettings(SettingsMixin):
    """Where the flow `clean` maps its scoring shards (the flow's own parameters)."""

    task_runner: str = setting("threads", "threads: shards one after another in this process (each solve "
                               "already uses every core); dask: a LocalCluster, or the scheduler at dask_address",
                               choices=("threads", "dask"))
    dask_address: str | None = setting(None, "an existing Dask scheduler (tcp://host:8786)")
    dask_workers: int = setting(2, "LocalCluster worker processes (each gets cores / workers threads)")
    devices: str | None = setting(None, "CUDA devices that score, one Dask worker pinned to each (cuda:0,cuda:1); "
                                  "default: every visible one when --device is cuda and torch sees several "
                                  "(not with dask_address, whose workers are the scheduler's)")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.devices is not None:
            parse_devices(self.devices)
        if self.dask_workers < 1:
            raise ValueError(f"dask_workers must be at least 1, got {self.dask_workers}")
