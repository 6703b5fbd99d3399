"""The MLflow UI as a user sees it: a real headless Chromium (Debian's ``chromium`` and ``chromedriver``, driven by
Selenium) against ``python -m experiments ui`` on a tiny sweep.

Asserted on the rendered pages, not on the API: the URL the command prints opens the sweep's runs grouped by subset and
phase with OOD Dice charts that have points; each subset's pretrain run page shows its training-data input with a
digest of its own; the logged model's page shows the run's final ``ood/mean/dice``. Set ``HRTEM_UI_SCREENSHOTS`` to a
folder to keep screenshots of the pages (docs/ui-*.png were made so).

Without the browser the tests are skipped on a developer machine and fail in CI (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from selenium.common.exceptions import StaleElementReferenceException

from conftest import unavailable
from benchmarks.services import free_loopback_port, stop_process_group
from sweep_helpers import sweep_spec, write_spec

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 60


def _shot(driver, name: str) -> None:
    folder = os.environ.get("HRTEM_UI_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        # the MLflow Assistant panel opens by itself in a new browser profile; a user closes it once
        for button in driver.find_elements("css selector", "[data-component-id='mlflow.assistant.chat_panel.close']"):
            button.click()
            time.sleep(1)
        driver.save_screenshot(str(Path(folder) / f"ui-{name}.png"))


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        reason = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        unavailable("a headless browser", reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # no sandbox as root; no background connections (the machine has no network: they would only be refused)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1600,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # no Selenium Manager, no download
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def ui_sweep(workspace, tmp_path_factory):
    """A finished tiny sweep (2 subsets x 1 seed, pretrain + fine-tune, prediction images on) in its own store."""
    from experiments.sweep import run_sweep

    root = tmp_path_factory.mktemp("ui")
    spec = sweep_spec("ui", seeds=[0])
    spec["finetune"]["set"]["data.train"][0]["path"] = str(workspace / "target")
    path = write_spec(workspace, "sweep-ui.yaml", spec)
    store = f"sqlite:///{root / 'mlflow.db'}"
    summary = run_sweep(str(path), ["tracking.n_prediction_images=2", "epochs=2"], 1, f"sqlite:///{root / 'claims.db'}",
                        store, progress=False)
    assert summary["runs_by_status"] == {"FINISHED": 4}
    from mlplatform.report import write_report

    write_report("sweep", "ui", store, root / "report")
    return store


@pytest.fixture(scope="module")
def ui_url(ui_sweep, tmp_path_factory):
    """`python -m experiments ui` on the sweep's store; the comparison URL it prints."""
    port = free_loopback_port()
    log = tmp_path_factory.mktemp("ui-log") / "ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "experiments", "ui", "--tracking-uri", ui_sweep, "--port",
                                 str(port)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        url = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"experiments ui exited: {log.read_text()[-3000:]}"
            found = re.search(r"http://127\.0\.0\.1:\d+/\S+", log.read_text())
            url = found.group(0) if found else None
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                if url:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"experiments ui did not answer within 180 s: {log.read_text()[-3000:]}")
        yield url
    finally:
        stop_process_group(proc)


def _wait_for(driver, predicate, what: str):
    """Poll `predicate` until it returns something true. MLflow's React pages re-render while they load, so an
    element found a moment ago may be gone: a stale element counts as "not yet" and the predicate runs again."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"the page did not show {what} within {WAIT_S} s; it shows: "
                f"{driver.find_element('tag name', 'body').text[:2000]}")


def _text(driver) -> str:
    return driver.find_element("tag name", "body").text


def _cells(store: str) -> dict:
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("exp-test")
    runs = client.search_runs([exp.experiment_id], "tags.sweep = 'ui' and tags.kind = 'cell'")
    return {(r.data.tags["subset"], r.data.tags["phase"]): r for r in runs}


def test_first_page_shows_the_sweep_grouped_by_subset_with_ood_dice_charts(browser, ui_url, ui_sweep):
    assert "viewStateShareKey=" in ui_url and "workflowType=machine_learning" in ui_url
    browser.get(ui_url)
    for subset in ("all", "near-focus"):
        for phase in ("pretrain", "finetune"):
            _wait_for(browser, lambda: f"Group: subset: {subset}, phase: {phase}" in _text(browser),
                      f"the group of subset {subset}, phase {phase}")
    _wait_for(browser, lambda: "ood/bench/dice" in _text(browser), "an ood/bench/dice chart")
    points = _wait_for(browser, lambda: browser.execute_script(
        "return document.querySelectorAll('.js-plotly-plot .scatterlayer path.point').length"), "chart points")
    assert points > 0
    text = _text(browser)
    # the experiment's runs view, not the GenAI overview (its token usage charts) or a traces tab
    assert re.search(r"#/experiments/\d+/runs(\?|$)", browser.current_url), browser.current_url
    assert "Token usage" not in text
    assert "all-s0-pretrain" in text and "near-focus-s0-finetune" in text  # subset-first run names
    _shot(browser, "first-page")


def test_each_subset_shows_its_own_dataset_input_and_the_model_its_final_metric(browser, ui_url, ui_sweep):
    cells = _cells(ui_sweep)
    client = MlflowClient(ui_sweep)
    base = ui_url.split("/#/")[0]
    digests = {}
    for subset in ("all", "near-focus"):
        run = cells[(subset, "pretrain")]
        train = [d for d in run.inputs.dataset_inputs
                 if any(t.key == "mlflow.data.context" and t.value == "train" for t in d.tags)]
        assert len(train) == 1
        ds = train[0].dataset
        digests[subset] = ds.digest
        browser.get(f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
                    "?workflowType=machine_learning")
        _wait_for(browser, lambda: f"{ds.name} ({ds.digest})" in _text(browser),
                  f"the train input {ds.name} ({ds.digest}) of {subset}")
        assert f"Pretrain of subset {subset}" in _text(browser)  # the run's description
        if subset == "near-focus":
            _shot(browser, "run-page")
    assert digests["all"] != digests["near-focus"]

    run = cells[("near-focus", "finetune")]
    final = client.get_metric_history(run.info.run_id, "ood/mean/dice")
    assert [m.step for m in final] == [2, 3]  # a fine-tune's epochs continue the pretrain's two
    model_id = run.outputs.model_outputs[0].model_id
    model = client.get_logged_model(model_id)
    assert model.name == "near-focus-s0-finetune"
    linked = {m.key: m.value for m in model.metrics}
    assert linked["ood/mean/dice"] == final[-1].value  # the epoch it was saved at, not epoch 0
    browser.get(f"{base}/#/experiments/{run.info.experiment_id}/models/{model_id}?workflowType=machine_learning")
    def search_metric(name: str) -> bool:
        # find, type and read back in one try: the box may be re-rendered (and emptied) between any two of these
        boxes = browser.find_elements("css selector", "input[placeholder='Search metrics']")
        if not boxes:
            return False
        boxes[0].clear()
        boxes[0].send_keys(name)
        return boxes[0].get_attribute("value") == name

    _wait_for(browser, lambda: search_metric("ood/mean/dice"), "the model's metrics search box")
    _wait_for(browser, lambda: str(final[-1].value)[:10] in _text(browser),
              f"the model's ood/mean/dice = the run's final {final[-1].value}")
    _shot(browser, "model-page")


def test_the_sweep_run_describes_the_sweep_and_its_report_renders_inside_mlflow(browser, ui_url, ui_sweep):
    client = MlflowClient(ui_sweep)
    parent = client.search_runs([client.get_experiment_by_name("exp-test").experiment_id],
                                "tags.kind = 'sweep' and tags.sweep = 'ui'")[0]
    base = ui_url.split("/#/")[0]
    browser.get(f"{base}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
                "?workflowType=machine_learning")
    _wait_for(browser, lambda: "Sweep ui: 2 subsets x 1 seeds" in _text(browser), "the sweep's description")
    assert "summary/near-focus/finetune/ood_mean_dice" in _text(browser)  # summary metrics on the parent
    browser.get(f"{base}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}/artifacts/report/"
                "index.html?workflowType=machine_learning")
    def enter_report() -> bool:
        frames = browser.find_elements("css selector", "iframe.mlflow-html-iframe")
        if frames:
            browser.switch_to.frame(frames[0])
        return bool(frames)

    _wait_for(browser, enter_report, "the report in MLflow's HTML view")
    try:
        _wait_for(browser, lambda: "Sweep report: ui" in _text(browser), "the report's title")
        sizes = browser.execute_script(
            "return Array.from(document.images).map(i => [i.src.slice(0, 22), i.naturalWidth])")
        assert sizes and all(src == "data:image/png;base64," and width > 0 for src, width in sizes), sizes
        links = browser.execute_script("return Array.from(document.links).map(a => a.href)")
        assert any(f"/runs/{r.info.run_id}" in " ".join(links) for r in _cells(ui_sweep).values())
    finally:
        browser.switch_to.default_content()
