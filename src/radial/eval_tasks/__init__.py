"""lm-eval task configs over radial's normalized jsonl files.

The YAML templates next to this file mirror lm-eval's built-in arc_easy, arc_challenge, gsm8k and
(default) mmlu tasks, so our numbers are comparable with published lm-eval numbers; the built-in
tasks themselves would fetch their data from the Hub. `materialize` turns the templates into
concrete YAML files with absolute `data_files` paths, so the Python API
(`TaskManager(include_path=out_dir)`) and the `lm_eval --include_path out_dir` command line see
exactly the same tasks:

    arc_easy       -> radial_arc_easy
    arc_challenge  -> radial_arc_challenge
    gsm8k          -> radial_gsm8k
    mmlu           -> group radial_mmlu > groups radial_mmlu_{stem,...} > tasks radial_mmlu_<subject>
    synthetic      -> group radial_synthetic > tasks radial_synthetic_level<N>

MMLU subjects and synthetic levels are separate lm-eval tasks, but our data stage writes each
split as one file with a "subject"/"level" field, so `materialize` splits those rows into one
jsonl per subject/level under out_dir/data/.
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import yaml

from radial.utils import RadialError, atomic_path, read_jsonl, write_jsonl

TASKS = ("arc_easy", "arc_challenge", "gsm8k", "mmlu", "synthetic")
PREFIX = "radial_"

# Fields each template reads from a normalized row (see the shared data schema).
_REQUIRED_FIELDS = {
    "arc_easy": ("question", "choices", "answer"),
    "arc_challenge": ("question", "choices", "answer"),
    "gsm8k": ("question", "solution"),
    "mmlu": ("question", "choices", "answer", "subject"),
    "synthetic": ("question", "answer", "level"),
}
_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
_GROUP_VERSION = {"version": 2}  # as lm-eval's mmlu group files


def lm_eval_name(task: str) -> str:
    """The lm-eval task or group name radial registers for one of its `TASKS` (or their subtasks)."""
    return PREFIX + task


def evaluated_name(task: str) -> str:
    """The lm-eval task or group evaluated for `task`: radial's own for its `TASKS`, else the name itself."""
    return lm_eval_name(task) if task in TASKS else task


def external_tasks(tasks: Iterable[str]) -> list[str]:
    """The tasks that are not radial's own: lm-eval's (task or group names) or the user's (--include_path)."""
    return [task for task in tasks if task not in TASKS]


def task_manager(task: str, tasks_dir: str | Path | None = None, include_paths: Iterable[str | Path] = ()):
    """lm-eval's TaskManager that knows `task` (an lm-eval name): radial's materialized tasks in
    `tasks_dir` for its own; else the user's task folders, and lm-eval's own registry too only when
    they do not hold it (indexing its thousands of task files takes ~10-20 s, once per process)."""
    from lm_eval.tasks import TaskManager

    paths = tuple(str(path) for path in include_paths)
    if tasks_dir is not None:
        own = TaskManager(include_path=[str(tasks_dir)], include_defaults=False)
        if task in own.all_tasks:
            return own
    if paths and task in _task_manager(paths, defaults=False).all_tasks:
        return _task_manager(paths, defaults=False)
    return _task_manager(paths, defaults=True)


@functools.lru_cache(maxsize=None)
def _task_manager(paths: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=defaults)


def check_external_tasks(
    tasks: Iterable[str],
    include_paths: Iterable[str | Path] = (),
    key: str = "evaluate.tasks",
    path_key: str = "evaluate.include_path",
) -> None:
    """Fail, naming the task and where it was looked for, unless lm-eval knows every task that is
    not radial's own as a task or a group (a tag has no score of its own)."""
    import difflib

    import lm_eval

    include_paths = [Path(path) for path in include_paths]
    for path in include_paths:
        if not path.is_dir():
            raise RadialError(f"{path_key}: {path} is not a folder of lm-eval task YAMLs")
    where = f"lm-eval {lm_eval.__version__}'s task registry" + "".join(f" and {path}" for path in include_paths)
    for task in external_tasks(tasks):
        manager = task_manager(task, include_paths=include_paths)
        entry = manager.task_index.get(task)
        if entry is None:  # looked up in the registry and the user's folders together
            close = difflib.get_close_matches(task, list(manager.all_tasks) + list(TASKS), n=3)
            raise RadialError(
                f"{key}: unknown task {task!r}: not one of radial's ({', '.join(TASKS)}) nor in {where}"
                + (f"; close: {', '.join(close)}" if close else "")
            )
        if entry.kind.name == "TAG":
            members = sorted(entry.tags)  # a tag's entry lists its tasks
            raise RadialError(
                f"{key}: {task!r} is an lm-eval tag, a list of tasks without a score of its own"
                f" ({', '.join(members[:8])}{', ...' if len(members) > 8 else ''}); name its tasks instead"
            )


def materialize(data_dir: str | Path, out_dir: str | Path, tasks: Iterable[str]) -> Path:
    """Write concrete lm-eval YAMLs (and per-subject/level jsonl) for `tasks` into `out_dir`.

    Each file is written atomically; other files in `out_dir` are left alone. Returns `out_dir`,
    ready for `TaskManager(include_path=out_dir)` or `lm_eval --include_path out_dir`.
    """
    data_dir = Path(data_dir).resolve()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        if task not in TASKS:
            raise RadialError(f"unknown task {task!r}; radial's own are {', '.join(TASKS)}")
        if task == "mmlu":
            _materialize_mmlu(data_dir, out_dir)
        elif task == "synthetic":
            _materialize_synthetic(data_dir, out_dir)
        else:
            config = load_template(task)
            config["dataset_kwargs"] = _dataset_kwargs(config, data_dir / task, out_dir)
            _check_rows(config, _REQUIRED_FIELDS[task])
            _write_yaml(out_dir / f"{config['task']}.yaml", config)
    return out_dir


def load_template(name: str) -> dict[str, Any]:
    """One of the packaged YAML templates (arc_easy, arc_challenge, gsm8k, mmlu, synthetic)."""
    text = importlib.resources.files(__package__).joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text)


def _materialize_mmlu(data_dir: Path, out_dir: Path) -> None:
    template = load_template("mmlu")
    rows_by_split = {
        split: _group_rows(data_dir / "mmlu" / f"{split}.jsonl", "subject", _REQUIRED_FIELDS["mmlu"])
        for split in _splits(template)
    }
    known = lm_eval_mmlu_subjects()
    subjects = sorted(rows_by_split[template["test_split"]])
    for subject in subjects:
        if subject not in known:
            raise RadialError(
                f"{data_dir / 'mmlu' / 'test.jsonl'}: unknown MMLU subject {subject!r} (lm-eval knows {len(known)})"
            )
    tasks_by_category: dict[str, list[str]] = defaultdict(list)
    for subject in subjects:
        config = {
            "task": lm_eval_name(f"mmlu_{subject}"),
            "task_alias": known[subject]["task_alias"],
            "description": known[subject]["description"],
        }
        config |= {key: value for key, value in template.items() if key not in config}
        config["dataset_kwargs"] = _write_split_files(
            config, rows_by_split, subject, out_dir / "data" / "mmlu" / subject, out_dir
        )
        _write_yaml(out_dir / f"{config['task']}.yaml", config)
        tasks_by_category[known[subject]["category"]].append(config["task"])

    # The same two-level group as lm-eval's mmlu: categories, then the whole benchmark, each
    # aggregating accuracy weighted by the number of questions.
    categories = []
    for category, task_names in sorted(tasks_by_category.items()):
        group = lm_eval_name(f"mmlu_{category}")
        _write_yaml(out_dir / f"{group}.yaml", _group_config(group, category.replace("_", " "), task_names, "acc"))
        categories.append(group)
    _write_yaml(out_dir / "radial_mmlu.yaml", _group_config("radial_mmlu", "mmlu", categories, "acc"))


def _materialize_synthetic(data_dir: Path, out_dir: Path) -> None:
    template = load_template("synthetic")
    rows_by_split = {
        split: _group_rows(data_dir / "synthetic" / f"{split}.jsonl", "level", _REQUIRED_FIELDS["synthetic"])
        for split in _splits(template)
    }
    task_names = []
    for level in sorted(rows_by_split[template["test_split"]]):
        config = {"task": lm_eval_name(f"synthetic_level{level}"), "task_alias": f"level {level}"}
        config |= {key: value for key, value in template.items() if key not in config}
        config["dataset_kwargs"] = _write_split_files(
            config, rows_by_split, level, out_dir / "data" / "synthetic" / f"level{level}", out_dir
        )
        _write_yaml(out_dir / f"{config['task']}.yaml", config)
        task_names.append(config["task"])
    _write_yaml(
        out_dir / "radial_synthetic.yaml", _group_config("radial_synthetic", "synthetic", task_names, "exact_match")
    )


def lm_eval_mmlu_subjects() -> dict[str, dict[str, str]]:
    """subject -> {category, task_alias, description}, read from lm-eval's own default MMLU task files."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise RadialError("lm-eval is not installed")
    subjects = {}
    for path in sorted((Path(spec.origin).parent / "tasks" / "mmlu" / "default").glob("mmlu_*.yaml")):
        config = yaml.safe_load(path.read_text())
        subjects[config["dataset_name"]] = {
            "category": config["tag"].removeprefix("mmlu_").removesuffix("_tasks"),
            "task_alias": config["task_alias"],
            "description": config["description"],
        }
    return subjects


def _splits(config: dict[str, Any]) -> list[str]:
    return sorted({config[key] for key in _SPLIT_KEYS if config.get(key)})


def _dataset_kwargs(config: dict[str, Any], folder: Path, out_dir: Path) -> dict[str, Any]:
    """lm-eval's dataset_kwargs for the json loader: `folder/<split>.jsonl` for each split the task uses."""
    data_files = {}
    for split in _splits(config):
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            raise RadialError(f"{config['task']}: data file {path} not found (run the data stage first)")
        data_files[split] = str(path)
    # Keep the datasets cache with the generated tasks rather than growing ~/.cache per out_dir.
    return {"data_files": data_files, "cache_dir": str(out_dir / ".datasets_cache")}


def _write_split_files(
    config: dict[str, Any], rows_by_split: dict[str, dict], key: Any, folder: Path, out_dir: Path
) -> dict[str, Any]:
    for split, rows_by_key in rows_by_split.items():
        if not rows_by_key.get(key):
            raise RadialError(f"{config['task']}: no {split} rows for {key!r}")
        write_jsonl(folder / f"{split}.jsonl", rows_by_key[key])
    return _dataset_kwargs(config, folder, out_dir)


def _group_rows(path: Path, key: str, required: tuple[str, ...]) -> dict[Any, list[dict]]:
    if not path.is_file():
        raise RadialError(f"data file {path} not found (run the data stage first)")
    groups: dict[Any, list[dict]] = defaultdict(list)
    for line_no, row in enumerate(read_jsonl(path), 1):
        missing = [field for field in required if field not in row]
        if missing:
            raise RadialError(f"{path}:{line_no}: missing key(s) {', '.join(missing)}")
        groups[row[key]].append(row)
    return groups


def _check_rows(config: dict[str, Any], required: tuple[str, ...]) -> None:
    """Every row of the task's data files parses and has the fields its YAML reads, else file:line
    (lm-eval's json loader would fail deep inside `datasets`, naming neither)."""
    for path in config["dataset_kwargs"]["data_files"].values():
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise RadialError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
                missing = [field for field in required if not isinstance(row, dict) or field not in row]
                if missing:
                    raise RadialError(f"{path}:{line_no}: missing key(s) {', '.join(missing)}")


def _group_config(group: str, alias: str, tasks: list[str], metric: str) -> dict[str, Any]:
    return {
        "group": group,
        "group_alias": alias,
        "task": tasks,
        "aggregate_metric_list": [{"metric": metric, "weight_by_size": True}],
        "metadata": dict(_GROUP_VERSION),
    }


class _Dumper(yaml.SafeDumper):
    """Writes strings holding newlines as one double-quoted line ("...\\nAnswer:"), like the templates."""

    def represent_str(self, data: str) -> yaml.ScalarNode:
        return self.represent_scalar("tag:yaml.org,2002:str", data, style='"' if "\n" in data else None)


_Dumper.add_representer(str, _Dumper.represent_str)


def _write_yaml(path: Path, config: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000))
