"""Job config loading: base inheritance, overrides, typed validation with clear, early errors."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from dino_ray.config.loader import apply_overrides, config_hash, load_job, load_raw, parse_override
from dino_ray.config.typed import ConfigError

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "jobs"


@pytest.fixture
def demo_inputs(tmp_path, monkeypatch):
    """The demo preset names relative input folders: create empty ones in a scratch working dir."""
    for d in ("outputs/demo-data/pool", "outputs/demo-data/eval/test", "outputs/demo-data/eval/train"):
        (tmp_path / d).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_follow_the_vitg14_recipe(demo_inputs):
    job = load_job(write(demo_inputs, "j.yaml", "stages: [pretrain]\npretrain: {data: {source: {uri: outputs/demo-data/pool}}}\n"))
    assert job.pretrain.model.arch == "vit_giant2"
    assert job.pretrain.model.patch_size == 14
    assert job.pretrain.loss.dino_out_dim == 131072
    assert job.pretrain.schedule.total_iters == 625_000
    assert job.pretrain.data.crops.global_crops_size == 224 and job.pretrain.data.crops.local_crops_size == 98
    assert job.pretrain.train.zero_stage == 3


def test_every_shipped_job_loads(demo_inputs):
    for path in sorted(JOBS.glob("*.yaml")):
        job = load_job(path)
        assert job.stages, path
        assert path.read_text().startswith("#!/usr/bin/env -S dino-ray run"), path


def test_base_inheritance_and_overrides(demo_inputs):
    job = load_job(JOBS / "pretrain.yaml", ["pretrain.schedule.base_lr=1e-4", "pretrain.model.arch=vit_base",
                                            "pretrain.loss.centering=softmax"])
    assert job.stages == ["pretrain"]
    assert job.pretrain.schedule.base_lr == pytest.approx(1e-4)
    assert job.pretrain.model.arch == "vit_base"
    assert job.pretrain.model.embed_dim == 96  # from the preset, untouched
    assert job.pretrain.loss.centering == "softmax"
    assert len(job.sources) == 2 and job.sources[0].endswith("presets/demo.yaml")


def test_override_parsing():
    assert parse_override("a.b=1e-4") == (["a", "b"], "1e-4")  # YAML 1.1: a float needs a dot; typing coerces it
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("novalue")


@pytest.mark.parametrize("override, message", [
    ("pretrain.schedule.base_lrr=1", r"pretrain\.schedule\.base_lrr: unknown key; did you mean pretrain\.schedule\.base_lr\?"),
    ("pretrain.model.arch=vit_smal", r"pretrain\.model\.arch: 'vit_smal' is not one of .*; did you mean 'vit_small'\?"),
    ("pretrain.train.batch_size_per_worker=many", r"pretrain\.train\.batch_size_per_worker: expected an integer, got 'many'"),
    ("pretrain.model.drop_path_rate=1.5", r"pretrain\.model\.drop_path_rate: 1\.5 is out of range: must be < 1\.0"),
    ("pretrain.train.zero_stage=4", r"pretrain\.train\.zero_stage: 4 is out of range: must be <= 3"),
    ("stages=[pretrian]", r"unknown stage\(s\) \['pretrian'\]; did you mean 'pretrain'\?"),
    ("pretrain.data.source.uri=/nonexistent/images", r"pretrain\.data\.source(\.uri)?: .*(input path does not exist: /nonexistent/images|/nonexistent/images'? does not exist)"),
    ("pretrain.train.precision=fp8", r"pretrain\.train\.precision: 'fp8' is not one of"),
])
def test_bad_values_name_file_key_and_expectation(demo_inputs, override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_job(JOBS / "pretrain.yaml", [override])
    assert "pretrain.yaml" in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("highres.img_size=50", r"highres\.img_size: 50 is not a multiple of pretrain\.model\.patch_size 4"),
    ("highres.loss.dino_out_dim=128", r"highres\.loss: heads differ from the pretrain stage it loads "
                                      r"\(dino_out_dim: 256 in pretrain, 128 here\)"),
    ("distill.loss.head_hidden_dim=64", r"distill\.loss: heads differ from the highres stage"),
    ("distill.students=[{name: ../../x, model: {arch: vit_small, patch_size: 4, img_size: 32}}]",
     r"distill\.students: name '\.\./\.\./x' must be one folder name"),
    ("eval.datasets=[{name: a/b}]", r"eval\.datasets: name 'a/b' must be one folder name"),
    ("distill.teacher=/nowhere/teacher", r"distill\.teacher: input path does not exist: /nowhere/teacher"),
])
def test_cross_stage_mistakes_fail_at_validation(demo_inputs, override, message):
    with pytest.raises(ConfigError, match=message):
        load_job(JOBS / "pipeline.yaml", [override])


def test_bad_yaml_and_circular_base(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(write(tmp_path, "bad.yaml", "a: [1, 2\n"))
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular base"):
        load_job(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_job(tmp_path / "missing.yaml")


def test_duplicate_keys_binary_files_and_folders_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'seed' appears twice in one mapping \(lines 2 and 3\)"):
        load_job(write(tmp_path, "dup.yaml", "name: x\nseed: 1\nseed: 2\n"))
    merged = "a: &a {every: 5, size: 3}\nb: {<<: *a, every: 7}\n"  # a merge key may be overridden
    assert load_raw(write(tmp_path, "merge.yaml", merged))[0]["b"] == {"every": 7, "size": 3}
    (tmp_path / "bin.yaml").write_bytes(b"name: x\n\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_job(tmp_path / "bin.yaml")
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        load_job(tmp_path / "dir.yaml")


def test_curate_without_embedder_is_rejected(demo_inputs):
    with pytest.raises(ConfigError, match="curate.embed.checkpoint: is empty"):
        load_job(JOBS / "curate.yaml", ["curate.embed.bootstrap_iterations=0"])


def test_patch_size_must_agree(demo_inputs):
    with pytest.raises(ConfigError, match="patch_size"):
        load_job(JOBS / "pretrain.yaml", ["pretrain.model.patch_size=8"])


def test_config_hash_is_stable_and_sensitive(demo_inputs):
    a = load_job(JOBS / "pretrain.yaml")
    b = load_job(JOBS / "pretrain.yaml")
    c = load_job(JOBS / "pretrain.yaml", ["pretrain.schedule.base_lr=5e-4"])
    assert config_hash(a.pretrain) == config_hash(b.pretrain) != config_hash(c.pretrain)


def test_cli_fails_fast_before_ray(demo_inputs):
    """A typo is reported by the real CLI within seconds, with exit code 2 and no Ray start-up."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "dino_ray.cli", "run", str(JOBS / "pretrain.yaml"),
                           "pretrain.schedule.warmup_iter=10"], capture_output=True, text=True, timeout=60)
    elapsed = time.time() - start
    assert proc.returncode == 2, proc.stderr
    assert "did you mean pretrain.schedule.warmup_iters" in proc.stderr
    assert "Ray" not in proc.stdout
    assert elapsed < 5.0, f"config error took {elapsed:.1f}s"


# ----------------------------------------------------------------------------- one config convention


def test_every_wrong_key_is_reported_at_once(demo_inputs):
    with pytest.raises(ConfigError) as err:
        load_job(JOBS / "pretrain.yaml", ["pretrain.model.drop_path_rate=1.5", "pretrain.train.zero_stage=4",
                                          "pretrain.schedule.base_lrr=1", "pretrain.loss.centering=kmeans"])
    text = str(err.value)
    assert "pretrain.yaml" in text and "4 problems" in text
    for line in ("pretrain.model.drop_path_rate: 1.5 is out of range: must be < 1.0",
                 "pretrain.train.zero_stage: 4 is out of range: must be <= 3",
                 "pretrain.schedule.base_lrr: unknown key; did you mean pretrain.schedule.base_lr?",
                 "pretrain.loss.centering: 'kmeans' is not one of"):
        assert line in text, text
    assert sorted(p.key for p in err.value.problems) == ["pretrain.loss.centering", "pretrain.model.drop_path_rate",
                                                         "pretrain.schedule.base_lrr", "pretrain.train.zero_stage"]


def test_a_union_mismatch_says_what_each_alternative_wanted():
    from dataclasses import dataclass

    from dino_ray.config.typed import build

    @dataclass
    class Section:
        size: int | list[int] = 1  # evaluated in this module's globals: builtins only

    with pytest.raises(ConfigError, match=r"size: 'big' matches none of .*expected an integer.*expected a list"):
        build(Section, {"size": "big"})


@pytest.mark.parametrize("override, key, direct, message", [
    ("pretrain.schedule.base_lr=-1", "pretrain.schedule.base_lr",
     ("train.schedules", "ScheduleConfig", "base_lr", -1.0), "is out of range: must be > 0.0"),
    ("pretrain.loss.dino_out_dim=0", "pretrain.loss.dino_out_dim", ("losses.config", "LossConfig", "dino_out_dim", 0),
     "is out of range: must be >= 1"),
    ("pretrain.data.crops.interpolation=lanczos", "pretrain.data.crops.interpolation",
     ("data.crop_config", "MultiCropConfig", "interpolation", "lanczos"), "is not one of ['bicubic', 'bilinear']"),
    ("pretrain.data.masking.group_size=0", "pretrain.data.masking.group_size",
     ("data.masking", "MaskingConfig", "group_size", 0), "is out of range: must be >= 1"),
    ("curate.curation.sampling.target_fraction=2", "curate.curation.sampling.target_fraction",
     ("curation.config", "SamplingConfig", "target_fraction", 2.0), "is out of range: must be <= 1.0"),
    ("eval.linear.learning_rates=[0.1, -1]", "eval.linear.learning_rates",
     ("evals.config", "LinearGridConfig", "learning_rates", (0.1, -1.0)), "is out of range: must be > 0.0"),
])
def test_a_bound_declared_on_the_field_rejects_yaml_and_code(demo_inputs, override, key, direct, message):
    import importlib

    with pytest.raises(ConfigError) as err:
        load_job(JOBS / "pipeline.yaml", [override])
    assert f"{key}: " in str(err.value) and message in str(err.value)
    module, cls, name, value = direct
    with pytest.raises(ValueError) as err:
        getattr(importlib.import_module(f"dino_ray.{module}"), cls)(**{name: value})
    assert f".{name}={value!r}" in str(err.value) and message in str(err.value)


def _config_classes():
    import dataclasses
    import typing

    from dino_ray.config.schema import JobConfig

    seen, todo = set(), [JobConfig]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for tp in typing.get_type_hints(cls).values():
            stack = [tp]
            while stack:
                t = stack.pop()
                if dataclasses.is_dataclass(t):
                    todo.append(t)
                stack += list(typing.get_args(t))
    return seen


def test_every_config_class_follows_the_convention():
    """Reachable from JobConfig: checked on construction by the shared base; no __post_init__ of its own."""
    import dataclasses

    from dino_ray.config.fields import Checked

    classes = _config_classes()
    assert len(classes) > 20
    for cls in classes:
        assert issubclass(cls, Checked), cls
        assert "__post_init__" not in vars(cls), cls
        assert not any("choices" in f.metadata for f in dataclasses.fields(cls)), f"{cls}: use a Literal for choices"


def test_stage_names_come_from_the_job_type():
    import dataclasses

    from dino_ray.config.schema import STAGE_NAMES, JobConfig

    assert STAGE_NAMES == ("curate", "pretrain", "highres", "distill", "eval")
    assert STAGE_NAMES == tuple(f.name for f in dataclasses.fields(JobConfig) if f.metadata.get("stage"))
    assert JobConfig().stages == list(STAGE_NAMES) == list(JobConfig().stage_names())


def test_uri_fields_are_discovered_from_the_types(tmp_path, monkeypatch):
    from dino_ray.config.fields import uri_fields
    from dino_ray.config.schema import JobConfig, LabeledDatasetConfig
    from dino_ray.data.source_config import SourceConfig

    monkeypatch.chdir(tmp_path)
    job = JobConfig(stages=["curate", "eval"])
    job.curate.seed_set = SourceConfig("seeds")
    job.curate.eval_sets = [SourceConfig("held-out")]
    job.eval.datasets = [LabeledDatasetConfig(name="d", train=SourceConfig("tr"), test=SourceConfig(""))]
    job.eval.backbones = ["pretrain", "exported/vit"]
    found = {f.key: f.input for f in uri_fields(job)}
    assert {"output_root": None, "curate.pool.uri": "required", "curate.eval_sets[0].uri": "required",
            "curate.seed_set.uri": "required", "curate.embed.checkpoint": "optional",
            "pretrain.data.source.uri": "optional", "pretrain.monitor.train.uri": "required",
            "distill.teacher": "required", "eval.datasets[0].train.uri": "required",
            "eval.backbones[1]": None}.items() <= found.items()
    job.absolutize()
    assert job.curate.seed_set.uri == str(tmp_path / "seeds") and job.eval.datasets[0].train.uri == str(tmp_path / "tr")
    assert job.eval.backbones == ["pretrain", str(tmp_path / "exported/vit")] and job.distill.teacher == "highres"
    assert job.output_root == str(tmp_path / "outputs/run")
    with pytest.raises(ConfigError) as err:
        job.check_inputs("job.yaml")
    keys = sorted(p.key for p in err.value.problems)
    assert keys == ["curate.embed.checkpoint", "curate.eval_sets[0].uri", "curate.pool.uri", "curate.seed_set.uri",
                    "eval.datasets[0].test.uri", "eval.datasets[0].train.uri"], str(err.value)
    assert "eval.datasets[0].test.uri: is empty" in str(err.value)
    assert f"curate.seed_set.uri: input path does not exist: {tmp_path / 'seeds'}" in str(err.value)
