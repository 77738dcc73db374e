"""The run's settings model: one source for the CLI and the flow, checked whole before any work."""
import pytest

from pipeline.fields import options
from pipeline.run.settings import FlowSettings, RunSettings, ScoreSettings

BASE = {"data": "d", "model": "m", "out": "o"}


def test_defaults_and_flat_names_users_type():
    s = RunSettings.from_flat(BASE)
    flat = s.flat()
    assert flat["solver"] == "heun" and flat["steps"] == 8 and flat["probe_mode"] == "fresh"
    assert flat["flag_quantile"] is None and flat["augment_tries"] == 3 and flat["augment_seed"] == 0
    assert {"data", "model", "out", "reference", "flag_fpr", "dup_threshold", "accept_band", "shard_size",
            "cache_dir", "no_cache", "variant", "data_range", "precision"} <= set(flat)
    assert RunSettings.from_flat(flat) == s


def test_every_name_is_unique_across_the_run_and_the_flow():
    names = [o.name for o in options(RunSettings) + options(FlowSettings)]
    assert len(names) == len(set(names))
    assert {o.name for o in options(ScoreSettings)} <= {o.name for o in options(RunSettings)}


@pytest.mark.parametrize("bad,message", [
    ({"flag_quantile": 1.5}, "--flag-quantile"), ({"reference": "r", "flag_zscore": 2.0}, "one flagging policy"),
    ({"against": "prev", "action": "drop"}, "--against"), ({"steps": 0}, "steps"),
    ({"accept_band": 0.6}, "--accept-band"), ({"batch_size": 0}, "--batch-size"),
    ({"shard_size": 0}, "--shard-size"), ({"nonsense": 1}, "unknown settings"),
    ({"precision_target": 1.5}, "--precision-target"), ({"max_passes": 0}, "--max-passes"),
    ({"score": "beauty"}, "--score 'beauty'"), ({"loss_noises": 2000}, "--loss-noises"),
])
def test_bad_settings_are_refused_when_built(bad, message):
    with pytest.raises(ValueError, match=message):
        RunSettings.from_flat({**BASE, **bad})


def test_flow_settings():
    assert FlowSettings.from_flat({}).task_runner == "threads"
    with pytest.raises(ValueError):
        FlowSettings.from_flat({"dask_workers": 0})


@pytest.mark.parametrize("flat,message", [({"device": "tpu"}, "--device 'tpu'"),
                                          ({"data_range": "bytes"}, "--data-range 'bytes'"),
                                          ({"solver": "rk9"}, "--solver 'rk9'"), ({"action": "burn"}, "--action 'burn'")])
def test_choices_are_checked_however_the_settings_arrive(flat, message):
    """The flow builds settings from flat parameters, not through argparse's choices: every
    setting with choices refuses other values itself."""
    with pytest.raises(ValueError, match=message):
        RunSettings.from_flat({**BASE, **flat})
    with pytest.raises(ValueError, match="--task-runner 'ray'"):
        FlowSettings.from_flat({"task_runner": "ray"})


@pytest.mark.parametrize("device,ok", [("cpu", True), ("cuda", True), ("cuda:1", True), ("cuda:", False),
                                       ("cuda:x", False), ("gpu", False), ("CPU", False)])
def test_one_device_check_for_the_model_and_for_dedup(device, ok):
    """`--device` means the same in every verb: the model's (score, clean) and the embedder's
    (dedup) accept and refuse the same values, with the same words."""
    from pipeline.run.settings import DedupRunSettings

    for model in (RunSettings, DedupRunSettings):
        flat = {**BASE, "device": device} if model is RunSettings else {"data": "d", "out": "o", "device": device}
        if ok:
            assert model.from_flat(flat).flat()["device"] == device
        else:
            with pytest.raises(ValueError, match=f"--device {device!r} is not a device: cpu, cuda or cuda:N"):
                model.from_flat(flat)


def test_every_verb_has_its_model_here_and_its_options_from_it():
    """Each verb's command-line options are its settings model's: none is written by hand."""
    import dataclasses

    from memclean.cli import build_parser
    from pipeline.run.settings import DedupRunSettings, TrainRunSettings

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for verb, model in (("score", ScoreSettings), ("clean", RunSettings), ("dedup", DedupRunSettings),
                        ("train", TrainRunSettings)):
        given = {a.dest for a in sub[verb]._actions if a.dest != "help"}
        assert given == {o.name for o in options(model) if o.cli}, verb
    assert {f.name for f in dataclasses.fields(TrainRunSettings)} == {"input", "output", "train"}


def test_the_duplicate_threshold_is_auto_or_a_similarity():
    """--dup-threshold auto (the default; None from an older deployment means it too) or a number
    in [-1, 1], from the command line's text or a flow parameter's float."""
    from pipeline.decide.clusters import DedupSettings

    assert DedupSettings().auto and DedupSettings(dup_threshold=None).dup_threshold == "auto"
    assert DedupSettings(dup_threshold="0.97").dup_threshold == 0.97 and not DedupSettings(dup_threshold=0.5).auto
    for bad in ("high", 1.5, "-2"):
        with pytest.raises(ValueError, match="--dup-threshold"):
            DedupSettings(dup_threshold=bad)
    with pytest.raises(ValueError, match="--dup-false-join-rate"):
        DedupSettings(dup_false_join_rate=0.7)