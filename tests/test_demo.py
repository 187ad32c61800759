"""`pmsolve demo` end to end on the built-in SmolLM2 (small settings): one line per stage."""

import re

import pytest

from pmsolve import cli
from pmsolve.models.loading import DEFAULT_MODEL_ID, ensure_default_converted

pytestmark = pytest.mark.slow


def test_demo_reports_every_stage_with_its_time(tmp_path, monkeypatch, capsys):
    # The shared converted model, everything else (statistics, templates) fresh.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / DEFAULT_MODEL_ID).symlink_to(ensure_default_converted())
    monkeypatch.setenv("PMSOLVE_CACHE", str(tmp_path))
    assert cli.main(["demo", "--facts", "2", "--control", "1", "--stats-tokens", "2000"]) == 0
    out = capsys.readouterr().out
    for i, stage in enumerate(("model", "statistics", "before", "edit", "after"), 1):
        assert f"[{i}/5]" in out
        assert re.search(rf"^\s+{stage}: [0-9.]+ s \(CPU [0-9.]+ s\)", out, re.M), stage
    assert "(2000 tokens)" in out and "layer 3/3 edited" in out
    assert re.search(r"efficacy\s+[0-9.]+% →\s+[0-9.]+%", out)
    assert re.search(r"^time: [0-9.]+ s wall", out, re.M)

    # Again: v* and the unedited model's results come from the first run, the edit is the same.
    assert cli.main(["demo", "--facts", "2", "--control", "1", "--stats-tokens", "2000"]) == 0
    again = capsys.readouterr().out
    assert "(cached)" in again and again.count("from an earlier run") == 2
    scores = lambda text: text[text.index("SCORES"):text.index("time:")]  # noqa: E731
    assert scores(again) == scores(out)
