"""`tunelab compare`: the forgetting table from hand-written metrics.jsonl files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from tunelab.eval.relative import forgetting_table
from tunelab.errors import ConfigError, RunDirError


def _eval(step, domain, loss, bpb=None, role=None, **extra):
    event = {"event": "eval", "step": step, "tokens": step * 100, "domain": domain, "loss": loss, "ppl": 2.718 ** loss,
             "bpb": bpb, "eval_tokens": 4096, "split": "held-out", "time": 1.0 + step, **extra}
    if role is not None:
        event["role"] = role
    return event


def _train(step, loss=5.0):
    return {"event": "train", "step": step, "tokens": step * 100, "lr": 1e-3, "loss": loss, "time": 1.0 + step}


def _write_run(path: Path, events: list[dict], torn_last_line: bool = False) -> Path:
    path.mkdir(parents=True)
    lines = [json.dumps(e) for e in events]
    if torn_last_line:
        lines.append('{"event": "train", "st')  # a killed run's cut-off line
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (path / "config.yaml").write_text("name: x\n")
    return path


@pytest.fixture()
def runs(tmp_path) -> dict[str, Path]:
    # A continued run that was killed after its step-20 eval and resumed from the step-10 checkpoint:
    # the re-run step-20 evals replace the ones logged before the crash.
    cont = _write_run(tmp_path / "cont", [
        {"event": "start", "step": 0},
        _eval(0, "prose", 3.0, 1.5, "reference", delta_from_start=0.0, bpb_delta_from_start=0.0),
        _eval(0, "code", 4.0, 2.0, "target", delta_from_start=0.0, bpb_delta_from_start=0.0),
        _eval(0, "tests", 3.5, None, "reference", delta_from_start=0.0, bpb_delta_from_start=None),
        *[_train(s) for s in range(1, 11)],
        _eval(10, "prose", 3.1, 1.55, "reference"), _eval(10, "code", 3.6, 1.8, "target"),
        _eval(10, "tests", 3.4, None, "reference"),
        *[_train(s) for s in range(11, 21)],
        _eval(20, "prose", 3.9, 1.9, "reference"), _eval(20, "code", 3.0, 1.4, "target"),
        _eval(20, "tests", 3.45, None, "reference"),
        _train(21),
        {"event": "resume", "step": 10, "from": "checkpoints/step-10"},
        *[_train(s) for s in range(11, 21)],
        _eval(20, "prose", 3.2, 1.58, "reference", delta_from_start=0.2),
        _eval(20, "code", 3.3, 1.7, "target", delta_from_start=-0.7),
        _eval(20, "tests", 3.6, None, "reference", delta_from_start=0.1),
        {"event": "done", "step": 20},
    ], torn_last_line=True)
    # A run from before forgetting tracking: no role fields, no step-0 evaluation, no tests domain.
    old = _write_run(tmp_path / "old", [
        *[_train(s) for s in range(1, 51)],
        _eval(50, "prose", 2.9, 1.45), _eval(50, "code", 3.9, 1.95),
        _eval(100, "prose", 2.8, 1.4), _eval(100, "code", 3.7, 1.9),
    ])
    # Roles that disagree with cont's, and a domain evaluated only early on.
    mix = _write_run(tmp_path / "mix", [
        _eval(0, "prose", 3.0, 1.5, "target"), _eval(0, "code", 4.0, 2.0, "reference"),
        _eval(0, "notes", 2.0, 1.0, "reference"),
        _eval(3, "notes", 2.2, 1.1, "reference"),
        _eval(5, "prose", 2.5, 1.2, "target"), _eval(5, "code", 4.5, 2.2, "reference"),
    ])
    return {"cont": cont, "old": old, "mix": mix}


def _row(table, domain):
    return next(r for r in table["rows"] if r["domain"] == domain)


def test_deltas_from_each_runs_step_zero(runs):
    table = forgetting_table([runs["cont"], runs["old"]])
    assert table["metric"] == "loss" and table["reference"] == "start" and table["base"] is None
    assert [r["domain"] for r in table["rows"]] == ["code", "prose", "tests"]  # targets first
    assert [r["role"] for r in table["rows"]] == ["target", "reference", "reference"]

    cont = {r["domain"]: r["cells"]["cont"] for r in table["rows"]}
    assert cont["prose"] == {"value": 3.2, "from": 3.0, "delta": pytest.approx(0.2), "step": 20,
                             "role": "reference", "worst": True}
    assert cont["code"] == {"value": 3.3, "from": 4.0, "delta": pytest.approx(-0.7), "step": 20,
                            "role": "target", "worst": False}
    assert cont["tests"] == {"value": 3.6, "from": 3.5, "delta": pytest.approx(0.1), "step": 20,
                             "role": "reference", "worst": False}

    old = {r["domain"]: r["cells"]["old"] for r in table["rows"]}
    assert old["prose"] == {"value": 2.8, "from": None, "delta": None, "step": 100, "role": "?", "worst": False}
    assert old["code"] == {"value": 3.7, "from": None, "delta": None, "step": 100, "role": "?", "worst": False}
    assert old["tests"] is None

    c, o = table["runs"]
    assert c == {"name": "cont", "path": str(runs["cont"]), "final_step": 20, "has_start": True,
                 "mean_forgetting": pytest.approx(0.15), "n_reference": 2, "mean_gain": pytest.approx(0.7),
                 "n_target": 1, "worst": {"domain": "prose", "delta": pytest.approx(0.2)}}
    assert o == {"name": "old", "path": str(runs["old"]), "final_step": 100, "has_start": False,
                 "mean_forgetting": None, "n_reference": 0, "mean_gain": None, "n_target": 0, "worst": None}
    assert len(table["footnotes"]) == 1 and table["footnotes"][0].startswith("old: no step-0 evaluation")


def test_bpb_metric(runs):
    table = forgetting_table([runs["cont"]], metric="bpb")
    cont = {r["domain"]: r["cells"]["cont"] for r in table["rows"]}
    assert (cont["prose"]["value"], cont["prose"]["delta"]) == (1.58, pytest.approx(0.08))
    assert (cont["code"]["value"], cont["code"]["delta"]) == (1.7, pytest.approx(-0.3))
    assert (cont["tests"]["value"], cont["tests"]["delta"]) == (None, None)  # bpb not recorded
    run = table["runs"][0]
    assert run["mean_forgetting"] == pytest.approx(0.08) and run["n_reference"] == 1
    assert run["mean_gain"] == pytest.approx(0.3) and run["worst"]["domain"] == "prose"


def test_base_run(runs):
    table = forgetting_table([runs["cont"]], base=runs["old"])
    assert table["reference"] == "base"
    assert table["base"] == {"name": "old", "path": str(runs["old"]), "final_step": 100,
                             "values": {"prose": 2.8, "code": 3.7}}
    cont = {r["domain"]: r["cells"]["cont"] for r in table["rows"]}
    assert (cont["prose"]["from"], cont["prose"]["delta"], cont["prose"]["worst"]) == (2.8, pytest.approx(0.4), True)
    assert (cont["code"]["from"], cont["code"]["delta"]) == (3.7, pytest.approx(-0.4))
    assert (cont["tests"]["value"], cont["tests"]["from"], cont["tests"]["delta"]) == (3.6, None, None)
    run = table["runs"][0]
    assert run["mean_forgetting"] == pytest.approx(0.4) and run["n_reference"] == 1
    assert run["mean_gain"] == pytest.approx(0.4) and run["n_target"] == 1
    assert run["worst"] == {"domain": "prose", "delta": pytest.approx(0.4)}
    assert table["footnotes"] == ["base old has no evaluation of tests: no delta there"]

    # An old run has deltas against a base even without a step-0 evaluation.
    table = forgetting_table([runs["old"]], base=runs["cont"])
    old = {r["domain"]: r["cells"]["old"] for r in table["rows"]}
    assert old["prose"]["delta"] == pytest.approx(2.8 - 3.2) and old["code"]["delta"] == pytest.approx(3.7 - 3.3)
    assert table["runs"][0]["n_reference"] == 0 and table["runs"][0]["worst"] is None  # roles unknown
    assert any(note.startswith("role ?") for note in table["footnotes"])


def test_mixed_roles_and_stale_domain(runs):
    table = forgetting_table([runs["cont"], runs["mix"]])
    assert {r["domain"]: r["role"] for r in table["rows"]} == \
        {"prose": "mixed", "code": "mixed", "tests": "reference", "notes": "reference"}
    assert [r["domain"] for r in table["rows"]] == ["tests", "notes", "prose", "code"]
    mix = {r["domain"]: r["cells"]["mix"] for r in table["rows"]}
    assert mix["prose"]["role"] == "target" and mix["prose"]["delta"] == pytest.approx(-0.5)
    assert mix["code"]["role"] == "reference" and mix["code"]["delta"] == pytest.approx(0.5) and mix["code"]["worst"]
    assert mix["notes"]["step"] == 3 and mix["notes"]["delta"] == pytest.approx(0.2) and not mix["notes"]["worst"]
    run = table["runs"][1]
    assert run["mean_forgetting"] == pytest.approx(0.35) and run["mean_gain"] == pytest.approx(0.5)
    assert run["worst"] == {"domain": "code", "delta": pytest.approx(0.5)}
    # cont's worst is still measured on its own roles
    assert table["runs"][0]["worst"]["domain"] == "prose"
    assert table["footnotes"] == ["mix: notes was last evaluated at step 3, the run's last evaluation is at step 5"]


def test_no_forgetting_flags_nothing(tmp_path):
    run = _write_run(tmp_path / "good", [_eval(0, "prose", 3.0, role="reference"), _eval(9, "prose", 2.9, role="reference")])
    table = forgetting_table([run, run])  # the same run twice counts once
    assert len(table["runs"]) == 1
    assert table["runs"][0]["worst"] is None and table["runs"][0]["mean_forgetting"] == pytest.approx(-0.1)
    assert not table["rows"][0]["cells"]["good"]["worst"]


def test_errors(tmp_path, runs):
    with pytest.raises(RunDirError, match="does not exist"):
        forgetting_table([tmp_path / "nope"])
    (runs["cont"] / "final").mkdir()
    with pytest.raises(RunDirError, match=r"no metrics.jsonl.*did you mean its run directory"):
        forgetting_table([runs["cont"] / "final"])
    with pytest.raises(ConfigError, match="--metric"):
        forgetting_table([runs["cont"]], metric="ppl")
    empty = _write_run(tmp_path / "fresh", [_train(1), _train(2)])
    with pytest.raises(RunDirError, match="no eval events"):
        forgetting_table([runs["cont"], empty])
    with pytest.raises(RunDirError, match="no eval events"):
        forgetting_table([runs["cont"]], base=empty)


def test_cli_json_and_table(runs):
    args = [str(runs["cont"]), str(runs["old"]), str(runs["mix"])]
    result = run_cli("compare", *args, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(json.dumps(forgetting_table(args)))

    result = run_cli("compare", *args, "--base", str(runs["old"]), "--metric", "bpb", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(json.dumps(forgetting_table(args, base=str(runs["old"]),
                                                                               metric="bpb")))

    result = run_cli("compare", *args)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for needle in ("forgetting: final loss (delta from each run's step 0)", "cont", "old", "mix",
                   "3.2000 R (+0.2000) *", "3.3000 T (-0.7000)", "3.6000 (+0.1000)", "2.8000", "notes", "role mixed",
                   "cont: forgetting +0.1500 mean over 2 reference domains (worst: prose +0.2000); "
                   "gain +0.7000 mean over 1 target domain",
                   "old: no deltas", "* worst forgetting", "old: no step-0 evaluation"):
        assert needle in out, (needle, out)

    result = run_cli("compare", str(runs["cont"]), "--base", str(runs["old"]))
    assert result.returncode == 0, result.stderr
    assert "delta from base old" in result.stdout and "3.6000 (-)" in result.stdout


@pytest.mark.parametrize("case", ["missing", "not_a_run", "no_evals", "bad_metric"])
def test_cli_errors_are_one_line_exit_2(tmp_path, runs, case):
    args, needle = {
        "missing": ([str(tmp_path / "nope")], "nope does not exist"),
        "not_a_run": ([str(runs["cont"]), str(tmp_path)], "is not a run directory"),
        "no_evals": ([str(_write_run(tmp_path / "fresh", [_train(1)]))], "fresh has no eval events"),
        "bad_metric": ([str(runs["cont"]), "--metric", "ppl"], "--metric"),
    }[case]
    result = run_cli("compare", *args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert needle in lines[0], lines[0]
    assert result.stdout == ""


def _long_named_runs(root: Path) -> list[Path]:
    def events(loss):
        return [*[_eval(0, d, 4.0, 2.0, "reference", delta_from_start=0.0) for d in ("prose", "tests")],
                _eval(0, "code", 4.0, 2.0, "target", delta_from_start=0.0), _train(1),
                *[_eval(100, d, loss, 2.1, "reference", delta_from_start=loss - 4.0) for d in ("prose", "tests")],
                _eval(100, "code", 3.0, 1.5, "target", delta_from_start=-1.0)]

    names = ["quickstart-code-replay", "quickstart-code-lora", "quickstart-code-full", "quickstart-code-dora",
             "quickstart-code-replay-10-percent-of-every-batch"]
    return [_write_run(root / name, events(4.1 + i / 10)) for i, name in enumerate(names)]


def test_run_names_are_never_cut_short(tmp_path, capsys):
    """Piped (not a terminal: pytest captures stdout), the tables take the width they need; on a narrow
    terminal a name column folds instead of ending in '…'."""
    import io

    from rich.console import Console

    from tunelab.commands.compare import render_table
    from tunelab.eval.relative import render_relative, relative_table

    runs = _long_named_runs(tmp_path)
    table = forgetting_table(runs)
    render_table(table)
    printed = capsys.readouterr().out
    assert "…" not in printed
    assert all(f" {run.name} " in printed or f"┃ {run.name} ┃" in printed for run in runs), printed
    narrow = io.StringIO()
    render_table(table, console=Console(file=narrow, width=60))
    assert "…" not in narrow.getvalue()

    results = {run.name: {"code": {"loss": 3.0 + i, "bpb": 1.0, "split": "held-out"}} for i, run in enumerate(runs)}
    relative = relative_table(results, {run.name: str(run) for run in runs},
                              {run.name: {"code": "target"} for run in runs}, base=runs[0].name)
    render_relative(relative)
    printed = capsys.readouterr().out
    assert "…" not in printed and all(run.name in printed for run in runs), printed
