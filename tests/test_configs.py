"""Every shipped YAML config loads into its stage's config class, and pipeline configs point at them.

The real-model configs (configs/<model>/) need GPUs and hub downloads, so they never
run here; this catches what would otherwise fail only on the GPU box: a renamed or
misspelt field, a value of the wrong type, a cross-field rule (`validate()`).
The stage is read from the file name (`sft.yaml` -> stages/01_sft.py, `ppo_tox0.yaml` -> stages/03_ppo.py:
the keys of scripts/run_pipeline.py's STAGE_SCRIPTS). A YAML with a `stages` mapping is a pipeline config
(configs/demo/pipeline.yaml is `make demo`, configs/demo/experiment.yaml the longer experiment).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import ModuleType

import pytest

from conftest import ROOT, load_script
from rlhf.config import StageConfig, load_config

CONFIGS = ROOT / "configs"
NOT_STAGE_CONFIGS = ("accelerate",)  # accelerate launcher configs, not ours


def _load_module(path: Path) -> ModuleType:
    return load_script(path, reuse=True)  # loaded once per script: every config test reads the same classes


STAGE_SCRIPTS: dict[str, str] = _load_module(ROOT / "scripts" / "run_pipeline.py").STAGE_SCRIPTS


def _is_pipeline(path: Path) -> bool:
    """A pipeline config (scripts/run_pipeline.py's input): a mapping with a `stages` mapping."""
    import yaml

    doc = yaml.safe_load(path.read_text())
    return isinstance(doc, dict) and isinstance(doc.get("stages"), dict)


DEMO_PIPELINES = ("pipeline.yaml", "experiment.yaml")


def _stage_yamls() -> list[Path]:
    return sorted(
        p for p in CONFIGS.rglob("*.yaml")
        if p.relative_to(CONFIGS).parts[0] not in NOT_STAGE_CONFIGS and not _is_pipeline(p)
    )


def _config_class(stage: str) -> type[StageConfig]:
    """The StageConfig subclass the stage script defines (skip when the script is not written yet)."""
    script = ROOT / STAGE_SCRIPTS[stage]
    if not script.exists():
        pytest.skip(f"{STAGE_SCRIPTS[stage]} does not exist yet")
    module = _load_module(script)
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if issubclass(c, StageConfig) and c is not StageConfig and c.__module__ == module.__name__]
    assert len(classes) == 1, f"{script.name} should define one StageConfig subclass, found {classes}"
    return classes[0]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("yaml_path", _stage_yamls(), ids=_rel)
def test_stage_yaml_loads_into_its_stage_config(yaml_path: Path):
    """Each configs/**/<stage>.yaml names only existing fields with values of the right type, and validates."""
    stage = yaml_path.stem
    assert stage in STAGE_SCRIPTS, (
        f"{_rel(yaml_path)}: cannot tell which stage reads it; name it one of "
        f"{', '.join(s + '.yaml' for s in STAGE_SCRIPTS)}"
    )
    cfg = load_config(_config_class(stage), yaml_path)
    assert isinstance(cfg, StageConfig)


def _pipeline_stages() -> list[tuple[Path, str, str]]:
    import yaml

    out = []
    for path in sorted(p for p in CONFIGS.rglob("*.yaml") if _is_pipeline(p)):
        stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
        out.extend((path, stage, str(cfg)) for stage, cfg in stages.items())
    return out


@pytest.mark.parametrize("name", DEMO_PIPELINES)
def test_demo_pipeline_exists_and_is_accepted_by_the_runner(name: str):
    """configs/demo/pipeline.yaml (what `make demo` runs) and experiment.yaml pass scripts/run_pipeline.py's own
    checks, with their stages in pipeline order."""
    runner = _load_module(ROOT / "scripts" / "run_pipeline.py")
    cfg = runner.load_pipeline(CONFIGS / "demo" / name)
    assert list(cfg["stages"]) == [s for s in STAGE_SCRIPTS if s in cfg["stages"]], "stages out of pipeline order"


def test_demo_experiment_extends_the_demo():
    """experiment.yaml runs every stage of `make demo` with the same config, registry, seed and data, so after the
    demo it reuses those entries and trains only what it adds; it ends with the comparison."""
    import yaml

    demo, experiment = (yaml.safe_load((CONFIGS / "demo" / n).read_text()) for n in DEMO_PIPELINES)
    assert {k: v for k, v in experiment.items() if k != "stages"} == {k: v for k, v in demo.items() if k != "stages"}
    assert demo["stages"].items() <= experiment["stages"].items()
    assert len(experiment["stages"]) > len(demo["stages"])
    assert list(demo["stages"])[-1] == list(experiment["stages"])[-1] == "compare"


@pytest.mark.parametrize(("pipeline", "stage", "stage_cfg"), _pipeline_stages(),
                         ids=lambda v: _rel(v) if isinstance(v, Path) else v)
def test_pipeline_stage_points_at_that_stages_config(pipeline: Path, stage: str, stage_cfg: str):
    """Each `stage: file` of a pipeline names a known stage and a config file for that stage, which loads."""
    assert stage in STAGE_SCRIPTS, f"{_rel(pipeline)}: unknown stage {stage!r}"
    path = ROOT / stage_cfg  # the runner resolves these against the repository root
    assert path.suffix == ".yaml" and path.stem == stage, f"{_rel(pipeline)}: {stage}: {stage_cfg} is not a {stage}.yaml"
    if not path.exists():
        pytest.skip(f"{stage_cfg} (named by {_rel(pipeline)}) does not exist yet")
    load_config(_config_class(stage), path)
