"""Pipeline mechanics with cheap fake steps: skipping finished steps, atomic records, continuing a killed run."""

import json

import pytest

from ranklens.errors import RanklensError
from ranklens.reproduce.pipeline import Step, run_steps, step_path


class Ctx:
    records: dict = {}


def _counting(name, calls, value, fail_on=None):
    def run(ctx):
        calls.append(name)
        if fail_on is not None and fail_on(len(calls)):
            raise KeyboardInterrupt
        return {"value": value, "seen": sorted(ctx.records)}

    return Step(name, f"step {name}", run, {"value": value, "bins": (0.0, 0.5)}, [f"ranklens {name} --out X"])


def test_finished_steps_are_skipped_and_records_complete(tmp_path):
    calls = []
    steps = [_counting("a", calls, 1), _counting("b", calls, 2)]
    records = run_steps(tmp_path, steps, Ctx(), progress=False)
    assert calls == ["a", "b"]
    assert records["b"]["result"] == {"value": 2, "seen": ["a"]}  # later steps see earlier records
    rec = json.loads(step_path(tmp_path, "a").read_text())
    assert {"name", "title", "config", "commands", "wall_seconds", "attempts", "result"} <= set(rec)
    assert rec["config"] == {"value": 1, "bins": [0.0, 0.5]} and rec["commands"] == ["ranklens a --out X"]
    again = run_steps(tmp_path, steps, Ctx(), progress=False)
    assert calls == ["a", "b"] and again == records  # nothing reran; the same records come back


def test_killed_step_leaves_no_record_and_continues(tmp_path):
    calls = []
    steps = [_counting("a", calls, 1), _counting("b", calls, 2, fail_on=lambda n: n == 2)]
    with pytest.raises(KeyboardInterrupt):
        run_steps(tmp_path, steps, Ctx(), progress=False)
    assert step_path(tmp_path, "a").exists() and not step_path(tmp_path, "b").exists()
    assert not [p for p in (tmp_path / "steps").iterdir() if p.name.endswith(".tmp")]  # nothing half-written
    partial = json.loads((tmp_path / "steps" / "b.partial.json").read_text())
    assert partial["attempts"] == 1 and partial["seconds"] >= 0
    records = run_steps(tmp_path, steps, Ctx(), progress=False)
    assert calls == ["a", "b", "b"]  # only the killed step ran again
    assert records["b"]["attempts"] == 2 and records["b"]["wall_seconds"] >= partial["seconds"]
    assert not (tmp_path / "steps" / "b.partial.json").exists()


def test_a_step_with_another_config_is_refused(tmp_path):
    run_steps(tmp_path, [_counting("a", [], 1)], Ctx(), progress=False)
    with pytest.raises(RanklensError, match="another config"):
        run_steps(tmp_path, [_counting("a", [], 5)], Ctx(), progress=False)
