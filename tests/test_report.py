import base64
import json
import logging
import math
import re

import pytest

from fastrl.cli import main
from fastrl.monitor.report import (
    ALL_PLOTS,
    draw,
    phase_spans,
    plan_report,
    read_metrics,
    timeline,
    write_report,
)

PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = list(ALL_PLOTS)
DECISION_KEYS = (
    "ctrl/habit_p_tool_call",
    "ctrl/first_p_tool_call",
    "ctrl/continue_p_tool_call",
    "ctrl/answer_p_tool_call",
)
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
    pngs = []
    for path in out["plots"]:
        data = open(path, "rb").read()
        assert data.startswith(PNG) and len(data) > 5000
        pngs.append(data)

    page = (run_dir / "report.html").read_text()
    assert out["html"] == str(run_dir / "report.html")
    # self-contained: every PNG inline, as written to report/, and no relative image link
    assert page.count('<img src="data:image/png;base64,') == len(PLOTS)
    for data in pngs:
        assert base64.b64encode(data).decode() in page
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(sources) == len(PLOTS)
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    for name in PLOTS:
        assert f"<figcaption>report/{name}" in page
    for key, value in SUMMARY.items():
        assert f"<td>{key}</td><td>{value}</td>" in page
    # per-phase table (global steps, then steps on the phase's own axis); the NaN success at
    # step 6 is left out of rl1's mean (0.2+0.4+0+0.6+0.8)/5
    assert "<td>warmup</td><td>sft</td><td>1</td><td>4</td><td>SFT 1–4</td><td>–</td>" in page
    assert "<td>rl1</td><td>rl</td><td>5</td><td>10</td><td>RL 1–6</td><td>0.4</td>" in page
    assert "<td>guard_sft</td><td>sft</td><td>11</td><td>12</td><td>corrective SFT 1–2</td>" in page
    assert "<td>rl2</td><td>rl</td><td>13</td><td>16</td><td>RL 7–10</td><td>0.9</td>" in page
    assert f"Alarm steps: {ALARM_STEP}</p>" in page
    assert f"<td>{ALARM_STEP}</td><td>3</td>" in page  # global step, RL step
    assert f"<td>{GUARD_STEP}</td><td>4</td><td>rollback+sft</td>" in page
    assert "<pre>run_dir: runs/x\nnote: &quot;a &lt;b&gt; &amp; c&quot;\n</pre>" in page
    # the NaN success (RL step 2) and the "nan" kl (RL step 3) are gaps, not points
    plans = _plans(read_metrics(run_dir))
    assert 2 not in plans["rl_success.png"].panels[0].series[0].xs
    kl = next(p for p in plans["rl_optimization.png"].panels if p.title == "kl")
    assert kl.series[0].xs == [1, 2, 4, 5, 6, 7, 8, 9, 10]
    # the decision probe's first and last values (RL steps 1 and 10)
    assert "<td>ctrl/habit_p_tool_call</td><td>1</td><td>0.5</td><td>10</td><td>0.94</td>" in page


def test_write_report_skips_empty_plots(run_dir):
    write_report(run_dir)  # all plots, then a run with SFT rows only
    rows = [_sft(s, "warmup") for s in range(1, 6)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "summary.json").unlink()
    out = write_report(run_dir)
    assert out["skipped"] == [name for name in PLOTS if name != "sft.png"]
    assert out["plots"] == [str(run_dir / "report" / "sft.png")]
    assert out["alarm_steps"] == [] and out["guard_steps"] == []
    assert sorted(p.name for p in (run_dir / "report").iterdir()) == ["sft.png"]
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and "no summary.json" in page
    assert "Skipped (no data): " + ", ".join(out["skipped"]) in page
    assert "Decision probe" not in page and "<h2>RL</h2>" not in page


def test_write_report_rl_only(run_dir):
    rows = [_rl(s, "rl1", 0.5) for s in range(1, 9)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = write_report(run_dir)
    assert out["skipped"] == ["sft.png", "sft_corrective.png"] and len(out["plots"]) == 5
    assert out["alarm_steps"] == [ALARM_STEP]
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and "<h2>SFT</h2>" not in page
    plans = {p.name: p for p in plan_report(rows)}
    assert plans["rl_success.png"].xlabel == "RL step (RL rows counted from 1; = global step)"


# --------------------------------------------------------------------------- a demo-shaped run
N_SFT, N_RL = 800, 45
ALARM_RL, GUARD_RL, GUARD_SFT = 29, 30, 3  # RL steps; guard_sft rows after the guard's step
EVAL_EVERY = 10
DEMO_SUMMARY = {"sft_success": 0.42, "rl_success": 0.71}
DEMO_CONFIG = "rl:\n  kl_coef: 0.0\n  updates_per_step: 1\n  lr: 1.0e-5\n"


def _demo_rows():
    """800 warm-up SFT rows, then 45 RL rows (reward == success, kl and clip_frac zero, the term
    off), an alarm, a guard action followed by 3 guard_sft rows, eval every 10 RL steps."""
    rows, step = [], 0

    def add(row):
        nonlocal step
        step += 1
        rows.append({"step": step, **row})

    for i in range(N_SFT):
        lr = 1e-3 * min(1.0, (i + 1) / 80)
        add({"phase": "sft", "phase/name": "warmup", "loss": 3.0 * 0.997**i + 0.2, "lr": lr,
             "grad_norm": 1.0 + 0.5 * math.sin(i / 7)})  # fmt: skip
    for k in range(1, N_RL + 1):
        success = 0.3 + 0.01 * k + 0.05 * math.sin(k)
        collapse = 0.3 if k == ALARM_RL else 0.02
        row = {"phase": "rl", "phase/name": "rl1", "reward/mean": success,
               "success/mean": success, "loss": 0.05 * math.cos(k), "kl": 0.0, "clip_frac": 0.0,
               "entropy": 0.6 - 0.005 * k, "grad_norm": 0.8, "lr": 1e-5 * min(1.0, k / 2),
               "ctrl/p_open_json": 0.95 - collapse, "ctrl/p_im_end": 0.02 + collapse,
               "ctrl/p_tool_call": 0.01, "ctrl/turn_p_im_end": 0.01, "ctrl/turn_p_tool_call": 0.6,
               "ctrl/after_call_p_im_end": 0.97, "ctrl/alarm": float(k == ALARM_RL),
               "ctrl/habit_p_tool_call": 0.35 + 0.01 * k, "ctrl/first_p_tool_call": 0.9,
               "ctrl/continue_p_tool_call": 0.93, "ctrl/answer_p_tool_call": 0.04,
               "state/healthy_call": 0.7 - collapse, "state/healthy_text": 0.27,
               "state/pollution": 0.03, "state/collapse": collapse,
               "guard/actions": int(k >= GUARD_RL)}  # fmt: skip
        if k % EVAL_EVERY == 0:
            row["eval/test_success"] = 0.4 + 0.01 * k
        if k == GUARD_RL:
            row["guard/action"] = "rollback+sft"
        add(row)
        if k == GUARD_RL:
            for _ in range(GUARD_SFT):
                add({"phase": "sft", "phase/name": "guard_sft", "loss": 0.4, "lr": 1e-4,
                     "grad_norm": 2.0})  # fmt: skip
    return rows


@pytest.fixture
def demo_dir(tmp_path):
    d = tmp_path / "demo"
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _demo_rows()))
    (d / "summary.json").write_text(json.dumps(DEMO_SUMMARY))
    (d / "config.yaml").write_text(DEMO_CONFIG)
    return d


def _plans(rows, config=None, summary=None):
    return {p.name: p for p in plan_report(rows, config, summary)}


def _keys(panel):
    return [s.key for s in panel.series if s.xs]


def test_rl_plots_use_the_rl_axis():
    config = {"rl": {"kl_coef": 0.0, "updates_per_step": 1}}
    plans = _plans(_demo_rows(), config, DEMO_SUMMARY)
    assert list(plans) == PLOTS
    rl_xs = set(range(1, N_RL + 1))
    for name, plot in plans.items():
        if plot.axis != "rl":
            continue
        assert plot.xlim[0] >= -0.5 and plot.xlim[1] < N_RL + 1.5, name  # not the 800 SFT steps
        assert plot.xlabel.startswith("RL step"), name
        for panel in plot.panels:
            for s in panel.series:
                assert set(s.xs) <= rl_xs | {0}, (name, s.key)
    (success,) = plans["rl_success.png"].panels
    # reward/mean is identical to success/mean: drawn once, and said so
    assert _keys(success) == ["success/mean", "eval/test_success", "sft_success", "rl_success"]
    assert success.series[0].xs == list(range(1, N_RL + 1))
    assert "reward/mean equals success/mean" in plans["rl_success.png"].notes[0]
    evals = next(s for s in success.series if s.key == "eval/test_success")
    assert evals.xs == [10, 20, 30, 40] and evals.style == "points"
    assert evals.ys == pytest.approx([0.5, 0.6, 0.7, 0.8])
    refs = {s.key: (s.xs, s.ys) for s in success.series if s.style == "reference"}
    assert refs == {"sft_success": ([0], [0.42]), "rl_success": ([N_RL], [0.71])}
    # alarm and guard marks on every RL plot, the guard's SFT phase shaded right after its step
    for plot in plans.values():
        if plot.axis == "rl":
            assert [(m.x, m.kind) for m in plot.marks] == [(ALARM_RL, "alarm"), (GUARD_RL, "guard")]
            ((first, last, label),) = [(b.first, b.last, b.label) for b in plot.bands]
            assert label == "guard_sft" and GUARD_RL < first < last < GUARD_RL + 1
    assert [p.title for p in plans["rl_control_tokens.png"].panels][1] == "at turn boundaries"
    assert len(_keys(plans["rl_control_tokens.png"].panels[1])) == 3
    (decision,) = plans["rl_decision.png"].panels
    assert _keys(decision)[:4] == list(DECISION_KEYS) and _keys(decision)[4] == "success/mean"
    (states,) = plans["rl_states.png"].panels
    assert states.stacked and states.series[3].ys[ALARM_RL - 1] == 0.3


def test_sft_plots_use_their_own_axes():
    plans = _plans(_demo_rows())
    warmup = plans["sft.png"]
    assert warmup.axis == "sft" and warmup.xlim == (0.5, N_SFT + 0.5)
    assert [p.title for p in warmup.panels] == ["loss", "grad_norm", "lr"]
    ((loss),) = warmup.panels[0].series
    assert (loss.label, loss.xs) == ("warmup", list(range(1, N_SFT + 1)))
    assert warmup.xlabel == "SFT step (SFT rows counted from 1; = global step)"
    # the guard's 3 SFT steps on their own axis, not lost at the end of the 800 warm-up steps
    corrective = plans["sft_corrective.png"]
    assert corrective.xlim == (0.5, GUARD_SFT + 0.5)
    ((loss),) = corrective.panels[0].series
    first = N_SFT + GUARD_RL + 1
    assert loss.label == f"guard_sft after RL step {GUARD_RL} (steps {first}–{first + 2})"
    assert loss.xs == [1, 2, 3]


def test_optimization_panels_only_for_terms_that_are_on():
    rows = _demo_rows()
    off = {"rl": {"kl_coef": 0.0, "updates_per_step": 1}}
    plot = _plans(rows, off)["rl_optimization.png"]
    assert [p.title for p in plot.panels] == ["loss", "entropy", "grad_norm", "lr"]
    assert any("rl.kl_coef = 0" in n for n in plot.notes)
    assert any("rl.updates_per_step = 1" in n for n in plot.notes)
    # no config: identically zero series are left out
    plot = _plans(rows)["rl_optimization.png"]
    assert [p.title for p in plot.panels] == ["loss", "entropy", "grad_norm", "lr"]
    assert any("zero at every RL step" in n for n in plot.notes)
    # configured on: drawn even where zero; nonzero without a config: drawn
    on = {"rl": {"kl_coef": 0.05, "updates_per_step": 4}}
    assert "kl" in [p.title for p in _plans(rows, on)["rl_optimization.png"].panels]
    assert "clip_frac" in [p.title for p in _plans(rows, on)["rl_optimization.png"].panels]
    rows[-1]["kl"] = 0.003
    assert "kl" in [p.title for p in _plans(rows)["rl_optimization.png"].panels]


def test_reward_drawn_when_it_differs_from_success():
    rows = _demo_rows()
    for r in rows:
        if r["phase"] == "rl":
            r["reward/mean"] = r["success/mean"] + 0.1  # a format reward on top
    (success,) = _plans(rows)["rl_success.png"].panels
    assert _keys(success) == ["success/mean", "reward/mean", "eval/test_success"]
    assert _plans(rows)["rl_success.png"].notes == []


def test_interleaved_phases_shaded_between_rl_steps():
    rows = [{"step": s, "phase": "sft", "phase/name": "warmup", "loss": 1.0} for s in (1, 2)]
    rows += [{"step": s, "phase": "rl", "phase/name": "rl1", "success/mean": 0.5} for s in (3, 4)]
    rows += [{"step": s, "phase": "sft", "phase/name": "ets1", "loss": 0.5} for s in (5, 6, 7)]
    rows += [{"step": s, "phase": "rl", "phase/name": "rl2", "success/mean": 0.6} for s in (8, 9)]
    tl = timeline(rows)
    assert [(p.x, p.step) for p in tl.rl] == [(1, 3), (2, 4), (3, 8), (4, 9)]
    assert [(r.after, r.name, [p.step for p in r.points]) for r in tl.runs] == [
        (2, "ets1", [5, 6, 7])
    ]
    plot = _plans(rows)["rl_success.png"]
    ((band),) = plot.bands
    assert band.label == "ets1" and 2 < band.first < band.last < 3
    assert plot.xlabel.endswith("global step = RL step + 2 up to 2, + 5 from 3)")
    assert [s.label for s in _plans(rows)["sft.png"].panels[0].series] == ["warmup"]
    corrective = _plans(rows)["sft_corrective.png"]
    assert [s.label for s in corrective.panels[0].series] == ["ets1 after RL step 2 (steps 5–7)"]


def test_demo_run_report(demo_dir):
    out = write_report(demo_dir)
    assert out["skipped"] == [] and len(out["plots"]) == len(PLOTS)
    assert out["alarm_steps"] == [N_SFT + ALARM_RL]
    assert out["guard_steps"] == [N_SFT + GUARD_RL]
    page = (demo_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(PLOTS) and 'src="report/' not in page
    assert "kl not drawn: off (rl.kl_coef = 0)" in page
    assert f"<td>{N_SFT + GUARD_RL}</td><td>{GUARD_RL}</td><td>rollback+sft</td>" in page
    for plot in plan_report(_demo_rows(), {}, DEMO_SUMMARY):
        assert draw(plot).startswith(PNG)


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
    assert len(out["plots"]) == len(PLOTS)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("fastrl: error:") and "metrics.jsonl" in captured.err
    (empty / "metrics.jsonl").write_text("")
    assert main(["report", str(empty)]) == 2
    assert "no metric rows" in capsys.readouterr().err
