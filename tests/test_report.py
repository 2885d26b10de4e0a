import json
import logging

import pytest

from fastrl.cli import main
from fastrl.monitor.report import phase_spans, read_metrics, write_report

PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = ["success.png", "control_tokens.png", "decision.png", "states.png", "optimization.png"]
ALARM_STEP, GUARD_STEP = 7, 8
SUMMARY = {"sft_success": 0.61, "rl_success": 0.77, "model": "tiny-test"}
CONFIG = 'run_dir: runs/x\nnote: "a <b> & c"\n'


def _sft(step, name):
    return {"step": step, "phase": "sft", "phase/name": name, "loss": 3.0 / step, "grad_norm": 1.5}


def _rl(step, name, success):
    collapse = 0.4 if step == ALARM_STEP else 0.0
    return {
        "step": step,
        "phase": "rl",
        "phase/name": name,
        "reward/mean": success,
        "success/mean": success,
        "loss": -0.1,
        "kl": 0.01 * step,
        "entropy": 0.5,
        "clip_frac": 0.02,
        "grad_norm": 2.0,
        "lr": 1e-5,
        "ctrl/p_open_json": 0.9 - collapse,
        "ctrl/p_im_end": 0.05 + collapse,
        "ctrl/p_tool_call": 0.05,
        "ctrl/alarm": float(step == ALARM_STEP),
        "ctrl/habit_p_tool_call": 0.3 + 0.04 * step,  # the decision probe: a habit unlearned
        "ctrl/first_p_tool_call": 0.9,
        "ctrl/continue_p_tool_call": 0.95,
        "ctrl/answer_p_tool_call": 0.05,
        "state/healthy_call": 0.7 - collapse,
        "state/healthy_text": 0.2,
        "state/pollution": 0.1,
        "state/collapse": collapse,
    }


def _lines():
    """warmup SFT 1-4, rl1 5-10 (alarm at 7, guard at 8), guard_sft 11-12, rl2 13-16."""
    rows = [_sft(s, "warmup") for s in range(1, 5)]
    rows += [_rl(s, "rl1", v) for s, v in zip(range(5, 11), [0.2, 0.0, 0.4, 0.0, 0.6, 0.8])]
    rows[5]["success/mean"] = float("nan")  # step 6; json.dumps writes the NaN literal
    rows[6]["kl"] = "nan"  # step 7, as MetricLogger writes non-finite values
    rows[7]["guard/action"] = "rollback+sft"  # step 8
    rows[7]["entropy"] = None
    rows[9]["eval/test_success"] = 0.5  # step 10
    rows += [_sft(s, "guard_sft") for s in (11, 12)]
    rows += [_rl(s, "rl2", 0.9) for s in range(13, 17)]
    rows[-1]["eval/test_success"] = 0.75  # step 16
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "")  # a blank line
    lines.append('{"step": 17, "phase": "rl", "reward/me')  # a run killed mid-write
    return lines


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text("\n".join(_lines()) + "\n")
    (d / "summary.json").write_text(json.dumps(SUMMARY))
    (d / "config.yaml").write_text(CONFIG)
    return d


def test_read_metrics_skips_bad_lines(run_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="fastrl.monitor.report"):
        rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert "corrupt line" in caplog.text and "blank line" in caplog.text


def test_phase_spans():
    rows = [
        {"step": 1, "phase": "sft"},
        {"step": 2, "phase": "sft"},
        {"step": 3, "phase": "rl", "phase/name": "rl1"},
        {"step": 4, "phase": "rl", "phase/name": "ets1"},
        {"step": 5, "phase": "rl", "phase/name": "ets1"},
        {"step": 6, "phase": "sft", "phase/name": "guard_sft"},
        {"step": 7, "phase": "rl", "phase/name": "rl2"},
        {"step": 8, "phase": "rl", "phase/name": "rl2"},
    ]
    assert phase_spans(rows) == [
        (1, 2, "sft", ""),
        (3, 3, "rl", "rl1"),
        (4, 5, "rl", "ets1"),
        (6, 6, "sft", "guard_sft"),
        (7, 8, "rl", "rl2"),
    ]
    assert phase_spans([]) == []


def test_write_report(run_dir):
    out = write_report(run_dir)
    assert out["plots"] == [str(run_dir / "report" / name) for name in PLOTS]
    assert out["skipped"] == []
    assert out["alarm_steps"] == [ALARM_STEP]
    assert out["guard_steps"] == [GUARD_STEP]
    for path in out["plots"]:
        data = open(path, "rb").read()
        assert data.startswith(PNG) and len(data) > 5000

    page = (run_dir / "report.html").read_text()
    assert out["html"] == str(run_dir / "report.html")
    for name in PLOTS:
        assert f'<img src="report/{name}"' in page
    for key, value in SUMMARY.items():
        assert f"<td>{key}</td><td>{value}</td>" in page
    # per-phase table; the NaN success at step 6 is left out of rl1's mean (0.2+0.4+0+0.6+0.8)/5
    assert "<td>warmup</td><td>sft</td><td>1</td><td>4</td><td>–</td>" in page
    assert "<td>rl1</td><td>rl</td><td>5</td><td>10</td><td>0.4</td>" in page
    assert "<td>guard_sft</td><td>sft</td><td>11</td><td>12</td><td>–</td>" in page
    assert "<td>rl2</td><td>rl</td><td>13</td><td>16</td><td>0.9</td>" in page
    assert f"Alarm steps: {ALARM_STEP}</p>" in page
    assert f"<td>{GUARD_STEP}</td><td>rollback+sft</td>" in page
    assert "<pre>run_dir: runs/x\nnote: &quot;a &lt;b&gt; &amp; c&quot;\n</pre>" in page
    # the decision probe's first and last values (steps 5 and 16)
    assert "<td>ctrl/habit_p_tool_call</td><td>5</td><td>0.5</td><td>16</td><td>0.94</td>" in page


def test_write_report_skips_empty_plots(run_dir):
    write_report(run_dir)  # all five plots, then a run with SFT rows only
    rows = [_sft(s, "warmup") for s in range(1, 6)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "summary.json").unlink()
    out = write_report(run_dir)
    assert out["skipped"] == ["success.png", "control_tokens.png", "decision.png", "states.png"]
    assert out["plots"] == [str(run_dir / "report" / "optimization.png")]
    assert out["alarm_steps"] == [] and out["guard_steps"] == []
    assert sorted(p.name for p in (run_dir / "report").iterdir()) == ["optimization.png"]
    page = (run_dir / "report.html").read_text()
    assert "report/states.png" not in page and "no summary.json" in page
    assert "Skipped (no data): success.png, control_tokens.png, decision.png, states.png" in page
    assert "Decision probe" not in page


def test_write_report_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\nnot json\n")
    with pytest.raises(ValueError, match="no metric rows"):
        write_report(tmp_path)


def test_cli_report(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir)]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    assert out["alarm_steps"] == [ALARM_STEP] and out["guard_steps"] == [GUARD_STEP]
    assert len(out["plots"]) == 5

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("fastrl: error:") and "metrics.jsonl" in captured.err
    (empty / "metrics.jsonl").write_text("")
    assert main(["report", str(empty)]) == 2
    assert "no metric rows" in capsys.readouterr().err
