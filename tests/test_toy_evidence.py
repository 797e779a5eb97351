"""weights/toyworld/evidence.py: runs made apart gather in one results.json, a row is compared with
the control on the seeds' examples pooled (each seed's control paired with the same seed's row), and
the picture draws every configuration beside its control's interval."""

import json
from pathlib import Path

import pytest

from eval_winoground import compare_runs
from weights.toyworld import evidence as te

SETTINGS = {"sds_weight": 1.0, "timesteps": 100, "train_flags": "--epochs 5 --trainable all",
            "world": "w", "models": "m", "quick": False}


def write_run(out: Path, split: str, row: str, seed: int, groups: list[bool],
              tag: str = "attribute") -> None:
    """A results file of eval_winoground.py --out: example i right in group (text and image) when
    groups[i]."""
    right, wrong = [[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]
    examples = [{"id": i, "collapsed_tag": tag if i % 2 == 0 else "object", "scores": right if ok
                 else wrong, "text": ok, "image": ok, "group": ok} for i, ok in enumerate(groups)]
    (out / f"{split}-{row}-seed{seed}.json").write_text(json.dumps({"examples": examples}))


def test_results_of_separate_invocations_are_gathered_and_replaced(tmp_path):
    first = te.save_results(tmp_path, SETTINGS, [("control", 0)], [{"rows": {}, "seconds": 1}])
    plan, done = te.save_results(tmp_path, SETTINGS, [("full", 0), ("control", 0)],
                                 [{"rows": {}, "seconds": 2}, {"rows": {}, "seconds": 3}])
    assert first[0] == [("control", 0)] and plan == [("control", 0), ("full", 0)]
    assert [d["seconds"] for d in done] == [3, 2]  # the control run again replaced the first one
    other = SETTINGS | {"train_flags": "--epochs 1"}
    plan, _ = te.save_results(tmp_path, other, [("full", 1)], [{"rows": {}, "seconds": 4}])
    # other settings: another table, the old one replaced (and said so)
    assert plan == [("full", 1)]
    assert te.earlier_runs(tmp_path, other, [("full", 1), ("full", 2)])[0] == [("full", 1)]
    with pytest.raises(SystemExit, match="other settings"):
        te.earlier_runs(tmp_path, SETTINGS, [("full", 1)])


def test_pooled_comparison_pairs_each_seed_with_its_own_control(tmp_path):
    # seed 0: the row is right where the control is wrong on examples 0 and 2; seed 1: the other way on 4
    write_run(tmp_path, "test", "control", 0, [False, False, False, True, True])
    write_run(tmp_path, "test", "full", 0, [True, False, True, True, True])
    write_run(tmp_path, "test", "control", 1, [True, True, True, True, True])
    write_run(tmp_path, "test", "full", 1, [True, True, True, True, False])
    text = te.pooled_comparison(tmp_path, "test", "full", [0, 1])
    pooled = json.loads((tmp_path / "pooled-test-full-seeds0-1.json").read_text())["examples"]
    assert sorted(e["id"] for e in pooled) == [0, 1, 2, 3, 4, 100_000, 100_001, 100_002, 100_003,
                                               100_004]
    group = compare_runs(tmp_path / "pooled-test-control-seeds0-1.json",
                         tmp_path / "pooled-test-full-seeds0-1.json")
    assert (group["metrics"]["group"]["only_a"], group["metrics"]["group"]["only_b"]) == (1, 2)
    attribute = compare_runs(tmp_path / "pooled-test-control-attribute-seeds0-1.json",
                             tmp_path / "pooled-test-full-attribute-seeds0-1.json")
    assert attribute["n"] == 6  # examples 0, 2, 4 of each seed
    assert (attribute["metrics"]["group"]["only_a"],
            attribute["metrics"]["group"]["only_b"]) == (1, 2)
    assert "full against control (test, attribute swaps, seeds [0, 1] pooled)" in text


def test_picture_draws_each_configuration_and_its_control(tmp_path):
    for name, flags in (("a", "--epochs 5 --trainable all"),
                        ("b", "--epochs 5 --trainable all --mapper fitted")):
        out = tmp_path / name
        out.mkdir()
        write_run(out, "val", "control", 0, [False] * 10)
        write_run(out, "val", "full", 0, [True, False] * 5)
        (out / "results.json").write_text(json.dumps({"settings": SETTINGS | {"train_flags": flags},
                                                      "plan": [["control", 0], ["full", 0]],
                                                      "runs": [{}, {}]}))
    rows = te.picture([tmp_path / "a" / "results.json", tmp_path / "b" / "results.json"],
                      tmp_path / "m.png")
    assert rows == [("all: control (lambda 0) (5 ep.)", [0.0, 0.0]),
                    ("all: SDS full, lambda 1, h_w fitted (5 ep.)", [100.0]),
                    ("all: SDS full, lambda 1, h_w joint (5 ep.)", [100.0])]
    assert (tmp_path / "m.png").stat().st_size > 0


@pytest.mark.parametrize("flags", [["--jobs", "0"], ["--timesteps", "0"], ["--timesteps", "1001"],
                                   ["--sds_weight", "nan"], ["--sds_weight", "-1"]])
def test_bad_options_are_one_argparse_line(tmp_path, capsys, flags):
    """Refused before anything is built or run: exit 2, one error line that names the flag."""
    with pytest.raises(SystemExit) as exit_:
        te.main([*flags, "--quick", "--world", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and ": error: " in error and flags[0] in error
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_a_failing_child_run_shows_its_own_error(tmp_path):
    """A child's output is kept in a log per run, and its failure prints the end of its stderr."""
    log = tmp_path / "logs" / "control-seed0-train"
    with pytest.raises(SystemExit, match=r"(?s)failed \(exit 1\).*boom: no such split") as exit_:
        te.run(["-c", "import sys; print('started'); sys.exit('boom: no such split')"], None, log)
    assert str(log) in str(exit_.value)
    assert (tmp_path / "logs" / "control-seed0-train.out").read_text() == "started\n"
    assert te.run(["-c", "print('fine')"], None, log) > 0  # a run that succeeds returns its time


def test_finished_runs_are_saved_as_they_finish(tmp_path, monkeypatch):
    """results.json holds the control run once it is done, though the next run fails."""

    def job(row, seed, *rest):
        if row == "full":
            raise SystemExit("weights.toyworld.evidence: the full run failed")
        return {"rows": {"val": {}}, "mechanism": {}, "seconds": 1.0}

    monkeypatch.setattr(te, "build", lambda *args, **kwargs: {})
    monkeypatch.setattr(te, "job", job)
    with pytest.raises(SystemExit, match="the full run failed"):
        te.main(["--rows", "control", "full", "--seeds", "0", "--splits", "val", "--out",
                 str(tmp_path), "--world", str(tmp_path / "w")])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["plan"] == [["control", 0]] and results["runs"][0]["seconds"] == 1.0


def test_out_is_never_a_link_nor_the_shipped_models(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(te, "build", lambda *args, **kwargs: pytest.fail("built before refusing"))
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for flags in (["--out", str(tmp_path / "link")], ["--out", str(te.MODELS_DIR / "runs")]):
        with pytest.raises(SystemExit) as exit_:
            te.main([*flags, "--world", str(tmp_path / "w")])
        assert exit_.value.code == 2 and "--out" in capsys.readouterr().err.splitlines()[-1]
