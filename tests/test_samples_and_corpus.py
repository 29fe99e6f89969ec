"""Samples on one console line (TensorBoard and metrics.jsonl keep the text); one builder of the sample corpus."""

import json
import threading
import time

from argonne_dt import corpus
from argonne_dt.metrics import MetricsLogger, one_line


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


def test_one_process_builds_the_sample_corpus_while_the_others_wait(tmp_path, monkeypatch, capsys):
    """Three ranks asking at once (threads here: the lock is per open file, as between processes)."""
    builds = []
    real_documents = corpus.stdlib_documents

    def slow_documents(*args, **kwargs):
        builds.append(threading.get_ident())
        time.sleep(1.0)  # every asker arrives while the first one builds
        return real_documents(*args, **kwargs)

    monkeypatch.setattr(corpus, "stdlib_documents", slow_documents)
    found = []
    askers = [threading.Thread(target=lambda: found.append(corpus.sample_corpus(tmp_path, max_files=12)))
              for _ in range(3)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join()
    assert len(builds) == 1 and len(set(found)) == 1 and (found[0] / "COMPLETE").exists()
    assert capsys.readouterr().err.count("sample corpus ready") == 1
