"""Log windows, progress and ETA, progress of long tools, metrics after a resume, samples on one console line."""

import io
import json
import math
import pickle

import pytest

from argonne_dt.metrics import (LogWindow, MetricsLogger, ProgressReporter, duration, eta_seconds, one_line,
                                progress_text)


def test_window_means_the_steps_since_the_previous_line_and_skips_non_finite_steps():
    window = LogWindow()
    for loss, norm in [(4.0, 1.0), (2.0, 3.0), (math.nan, 9.0), (3.0, 2.0)]:
        window.add({"loss": loss}, norm)
    assert window.steps == 4
    assert window.means() == {"loss": 3.0, "grad_norm": 2.0, "grad_norm_max": 3.0}
    window.reset()
    assert window.steps == 0 and math.isnan(window.means()["loss"])


def test_a_window_carried_through_a_checkpoint_means_the_same_steps():
    uninterrupted, before_the_stop = LogWindow(), LogWindow()
    for window in (uninterrupted, before_the_stop):
        window.add({"loss": 4.0, "ce": 3.0}, 1.0)
    resumed = LogWindow()
    resumed.load_state_dict(pickle.loads(pickle.dumps(before_the_stop.state_dict())))
    for window in (uninterrupted, resumed):
        window.add({"loss": 2.0, "ce": 1.0}, 3.0)
    assert resumed.means() == uninterrupted.means() == {"loss": 3.0, "ce": 2.0, "grad_norm": 2.0, "grad_norm_max": 3.0}
    assert resumed.steps == 2 and resumed.timed_steps == 1  # the rate counts the steps this process timed
    resumed.load_state_dict({})  # a checkpoint written without a window
    assert resumed.steps == 0 and math.isnan(resumed.means()["loss"])


def test_eta_comes_from_the_recent_step_rate():
    assert eta_seconds(100, 300, 1.5) == 300.0
    assert eta_seconds(300, 300, 1.5) == 0.0
    assert duration(3725) == "1h02m05s" and duration(245) == "4m05s" and duration(6.4) == "6s"
    assert progress_text(10, 300, 62, 6.0) == "step 10/300 (3.3%) | 1m02s elapsed | eta 29m00s"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_long_tools_draw_a_bar_on_a_terminal_and_plain_lines_in_a_log():
    terminal = _Terminal()
    bar = ProgressReporter(4, "exporting", "shards", stream=terminal)
    for _ in range(4):
        bar.advance()
    assert terminal.getvalue().count("\r") == 4 and "[" + "#" * 30 + "] 4/4 shards (100%)" in terminal.getvalue()
    log = io.StringIO()
    lines = ProgressReporter(1000, "tokenizing", stream=log, every_s=3600)
    for _ in range(1000):
        lines.advance()
    # Not a terminal: no redraws, one line at the end (and one per every_s before it).
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 1 and lines[0].startswith("tokenizing: 1000/1000 (100%)")


def test_a_resumed_run_drops_the_records_past_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    MetricsLogger(tmp_path, tensorboard=False, enabled=True, resume_step=2).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def _records(with_validation: bool) -> str:
    lines = [{"step": s, "loss": 10.0 - s / 10, "grad_norm": 1.0, "tokens_seen": 512 * s} for s in (10, 20, 30, 40)]
    if with_validation:
        lines += [{"step": 20, "eval_loss": 8.5, "eval_perplexity": 4914.8, "tokens_seen": 10240},
                  {"step": 40, "eval_loss": 7.5, "eval_perplexity": 1808.0}]  # an older record without tokens
    lines.append({"step": 40, "sample": "text"})
    return "".join(json.dumps(r) + "\n" for r in lines)


def test_the_plot_has_training_and_validation_curves_against_tokens(tmp_path):
    from argonne_dt.plot import plot_losses, read_curves, smoothed

    for with_validation in (False, True):
        run = tmp_path / f"run-{with_validation}"
        run.mkdir()
        (run / "metrics.jsonl").write_text(_records(with_validation))
        training, validation = read_curves(run / "metrics.jsonl")
        assert training == {10: (5120, 9.0), 20: (10240, 8.0), 30: (15360, 7.0), 40: (20480, 6.0)}
        assert validation == ({20: (10240, 8.5), 40: (20480, 7.5)} if with_validation else {})
        png = plot_losses(run)
        assert png == run / "loss_vs_tokens.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert smoothed([1.0, 2.0, 2.0]) == pytest.approx([1.0, 1.3, 1.51])


def test_the_package_logger_speaks_on_rank_zero_and_warns_on_every_rank(capsys, monkeypatch):
    from argonne_dt import metrics

    log = metrics.logger("argonne_dt.test_logger")
    log.info("step       1 | loss 2.0")
    assert capsys.readouterr().out == "step       1 | loss 2.0\n"  # the console line as it is
    monkeypatch.setattr(metrics, "is_rank_zero", lambda: False)  # another rank
    log.info("not here")
    log.info("a signal of this rank", extra=metrics.EVERY_RANK)
    log.warning("this rank's bad shard")
    out, err = capsys.readouterr()
    assert out == "a signal of this rank\n"
    assert err == "WARNING argonne_dt.test_logger: this rank's bad shard\n"


def test_a_sample_is_one_console_line_and_kept_as_is_elsewhere(tmp_path, capsys):
    sample = "Long long time ago, " + "\n" * 30 + "there  was\ta\r\n\n  king. " + "word " * 100
    assert one_line("a \n\n b\t c") == "a\\nb c"
    line = one_line(sample)
    assert line.startswith("Long long time ago,\\nthere was a\\nking. word word") and len(line) == 200
    assert line.endswith("...") and one_line("short") == "short"
    # The cut falls before a newline's "\\n", never between its two characters.
    assert one_line("x" * 10 + "\n" + "y" * 10, limit=14) == "x" * 10 + "..."

    logger = MetricsLogger(tmp_path, tensorboard=False, enabled=True)
    texts = []
    logger.writer = type("Writer", (), {"add_text": lambda self, *args: texts.append(args), "close": lambda self: None})()
    logger.text(100, "sample", sample)
    logger.close()
    printed = capsys.readouterr().out
    assert printed == f"step     100 | sample: {line}\n"
    assert texts == [("sample", sample, 100)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 100, "sample": sample}
