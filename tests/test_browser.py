"""The MLflow UI in a real headless Chromium: the study's parent run, its trials nested under it, Compare.

Runs under the `browser` marker (`make test-browser`, which installs chromium + chromium-driver).
Screenshots land in $SCREENSHOT_DIR (default: the test's temporary folder).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import StudyEnv, chromium, require_real_dataset, wait_until, write_tracking_study
from ui_process import free_port, start_ui, stop_ui

from pipeline.cli import main
from pipeline.spec import paths

pytestmark = pytest.mark.browser

def wait_for(condition, what: str):
    """What `condition()` finds on the page, once it does; the page is still rendering while elements come
    and go (any error: not yet)."""
    return wait_until(condition, f"the MLflow UI to show {what}", timeout=60, ignore=(Exception,), interval=0.5)


def walk_through_the_ui(env: StudyEnv, study: str, screenshots: Path) -> None:
    """Open `make ui`'s address, unfold the parent run, select its trials, Compare; assert at each step."""
    from selenium.webdriver.common.by import By

    trials = [t for t in env.records(study) if t.state != "WAITING"]
    names = {f"trial-{t.number:04d}" for t in trials}
    screenshots.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process, url = start_ui(env, study, port)
    browser = chromium()
    try:
        browser.get(url)

        def rows():
            return browser.find_elements(By.CSS_SELECTOR, "[role=row]")

        def page_showing(*markers: str) -> str | None:
            text = browser.find_element(By.TAG_NAME, "body").text
            return text if all(marker in text for marker in markers) else None

        parent = wait_for(lambda: next(r for r in rows() if study in r.text.split("\n")), "the study's parent run")
        assert not any(name in browser.page_source for name in names)  # the trials are nested, collapsed
        parent.find_element(By.CSS_SELECTOR, "button").click()  # the expander in the run-name cell
        wait_for(lambda: all(any(name in r.text for r in rows()) for name in names), "the trials under the parent")
        browser.save_screenshot(str(screenshots / f"{study}_runs_table.png"))

        for row in [r for r in rows() if any(name in r.text for name in names)]:
            row.find_element(By.CSS_SELECTOR, "input.ag-checkbox-input").click()
        compare = wait_for(lambda: next(b for b in browser.find_elements(By.TAG_NAME, "button")
                                        if b.text.strip().startswith("Compare")), "the Compare button")
        compare.click()
        body = wait_for(lambda: page_showing(f"Comparing {len(trials)} Runs", "Parameters"), "the compare view")
        for trial in trials:  # every trial's sampled learning rate, side by side
            assert str(trial.sampled["lr"]) in body
        assert "Parallel Coordinates Plot" in body
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .parcoords"),
                 "the parallel coordinates chart")
        browser.save_screenshot(str(screenshots / f"{study}_compare_runs.png"))
    finally:
        browser.quit()
        stop_ui(process, port)


def test_ui_lists_the_parent_with_trials_nested_and_compares_their_parameters(tracked_env_failing_at_lr, tmp_path):
    write_tracking_study(tracked_env_failing_at_lr, trials=3)
    assert tracked_env_failing_at_lr.run("search") == 0
    walk_through_the_ui(tracked_env_failing_at_lr, "tiny", Path(os.environ.get("SCREENSHOT_DIR", tmp_path)))


@pytest.mark.data
def test_ui_on_the_real_smoke_study(tmp_path, mlflow_store):
    """The smoke study as a new user runs it (real MNIST subset), in its own stores."""
    require_real_dataset("mnist")
    studies_dir = tmp_path / "studies"  # the shipped file in a folder of the test's own: its report stays there
    studies_dir.mkdir()
    shutil.copy(paths.STUDIES_DIR / "smoke.toml", studies_dir)
    stores = StudyEnv(studies_dir, f"sqlite:///{tmp_path}/optuna.db", paths.DATA_ROOT, tmp_path / "exports",
                      mlflow_store)
    assert main(["search", "--study", "smoke", "--storage", stores.storage, "--studies-dir", str(studies_dir),
                 *stores.report_args]) == 0
    walk_through_the_ui(stores, "smoke", Path(os.environ.get("SCREENSHOT_DIR", tmp_path)))
