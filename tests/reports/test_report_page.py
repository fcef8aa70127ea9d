"""The study report page (reports/<study>.html): written by every search and by `make report`, self-contained,
every section there with the study's own figures; in headless Chromium (marker `browser`) it loads from a file with
no console error and no request, and a screenshot is kept in $SCREENSHOT_DIR or the test's temporary folder."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from conftest import chromium, pareto_study, wait_until

from pipeline.search import pruning

pytestmark = pytest.mark.trained_values  # make test-portable runs these as a CPU without AVX-512 would

SECTIONS = ("searched", "budget", "history", "importances", "parallel", "intermediate", "top", "champion",
            "provenance")


def page_of(env) -> str:
    return (env.reports / "tiny.html").read_text()


def assert_self_contained(page: str) -> None:
    """No reference leaves the file: every src/href of the markup is inline data or an anchor, no script is
    fetched, and plotly.js is in it."""
    markup = re.sub(r"<script>.*?</script>", "<script></script>", page, flags=re.S)
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", markup)
    assert "<script src" not in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page  # the browser refuses any request
    assert "Plotly.newPlot" in page and len(page) > 3_000_000  # plotly.js itself, not a link to it


def test_a_search_writes_the_report_page_with_every_section(study_env, capsys):
    study_env.write_study(trials=4, pruner="median", epochs=2,
                          space={"lr": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True}},
                          baseline=[{"lr": 3e-3, "dropout": 0.1}, {"lr": 5e-3, "dropout": 0.0},
                                    {"lr": 1e-6, "dropout": 0.0}])
    assert study_env.run("search") == 0
    assert f"report: {study_env.reports / 'tiny.html'}" in capsys.readouterr().out
    page = page_of(study_env)
    assert_self_contained(page)
    assert (study_env.reports / "tiny.html").stat().st_mode & 0o777 == 0o644  # a page to share
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert 'id="pareto"' not in page  # one objective: no front
    records = study_env.records()
    # The budget's counts, the study file and its hash, the pruned trial with what it was compared with.
    assert re.search(r"<th>COMPLETE</th>.*?</tr>\s*<tr><td class=\"num\">4</td><td class=\"num\">"
                     rf"{sum(r.state == 'COMPLETE' for r in records)}</td>", page, re.S)
    assert "sampler <b>tpe</b>" in page and study_env.load().user_attrs["fingerprint"] in page
    pruned = next(r for r in records if r.state == "PRUNED")
    reason = pruning.PruneReason.from_dict(pruned.prune_reason)
    assert f"<td class=\"num\">{pruned.number}</td><td>pruned</td>" in page
    assert f"{reason.compared_with:.4f}" in page and reason.rule in page
    for key in ("history", "parallel", "intermediate"):  # Optuna's figures, drawn
        drawn = rf'<section id="{key}">\s*<h2>[^<]+</h2>\s*<div [^>]*>\s*<div id="[^"]+" class="plotly-graph-div"'
        assert re.search(drawn, page), key
    assert "Not exported yet" in page and "No replay yet" in page

    # Once exported and replayed, `make report` shows the test figures and the replay's verdict.
    best = max((r for r in records if r.state == "COMPLETE"), key=lambda r: r.values[0])
    assert study_env.run("export-best") == 0
    assert study_env.run("replay", "--trial", str(best.number)) == 0
    assert study_env.run("report") == 0
    page = page_of(study_env)
    assert "test accuracy <b>" in page and page.count('src="data:image/png;base64,') == 2
    assert f"<td>trial {best.number}</td>" in page and "matched bit for bit" in page


def test_a_multi_objective_report_shows_the_front_and_the_rule(study_env):
    study_env.write_study(**pareto_study())
    assert study_env.run("search") == 0
    page = page_of(study_env)
    assert_self_contained(page)
    assert '<section id="pareto">' in page and "Chosen from the Pareto front" in page
    assert "Constraints:\nparameter_count &lt;= " in page
    infeasible = [r for r in study_env.records() if r.fail_reason == "infeasible"]
    assert infeasible and all(f"<td class=\"num\">{r.number}</td><td>infeasible</td>" in page for r in infeasible)


def test_make_report_of_a_study_never_run_is_one_line_exit_2(study_env, capsys):
    study_env.write_study()
    assert study_env.run("report") == 2
    err = capsys.readouterr().err.strip()
    assert "tiny" in err and "\n" not in err
    assert not study_env.reports.exists()


@pytest.mark.browser
def test_the_report_page_opens_offline_in_chromium_without_errors_or_requests(study_env):
    study_env.write_study(**pareto_study())
    assert study_env.run("search") == 0
    browser = chromium()
    try:
        browser.get((study_env.reports / "tiny.html").as_uri())
        plots = wait_until(lambda: browser.execute_script(
            "return document.querySelectorAll('.js-plotly-plot .main-svg').length") >= 5 or None,
            "plotly to draw the figures", timeout=60)
        assert plots
        for section in (*SECTIONS, "pareto"):
            element = browser.find_element("id", section)
            assert element.is_displayed() and element.text.strip(), section
        # Errors only: Chromium warns about plotly's 3-D canvas reads (a performance hint, not a fault).
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        requested = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert requested == []
        # The test's artifact, beside the page it shows (SCREENSHOT_DIR keeps it: tests write outside the checkout)
        browser.set_window_size(1400, browser.execute_script("return document.body.scrollHeight"))
        assert browser.save_screenshot(str(Path(os.environ.get("SCREENSHOT_DIR", study_env.reports)) /
                                           "test-report-page.png"))
    finally:
        browser.quit()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
