"""The notebooks as a user meets them: JupyterLab on 127.0.0.1, driven by headless Chromium.

Opens 01_wikitext and 04_chat in smoke mode, runs every cell, and checks what the page shows: no
"Error displaying widget" and no traceback (also after saving and reloading the page), a changed
slider reaches the next training run, Enter in the chat box gets a streamed reply into a transcript
that starts clean. Screenshots go to a temporary folder whose path is printed.

Needs Debian's ``chromium`` and ``chromium-driver`` plus ``jupyterlab`` and ``selenium`` (the dev
extras); without them it is skipped with the reason (``.ci/run`` passes apt's failure on in
``NEWLLM_BROWSER_SKIP``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _skip_reason() -> str | None:
    if os.environ.get("NEWLLM_BROWSER_SKIP"):
        return os.environ["NEWLLM_BROWSER_SKIP"]
    if not CHROMIUM or not CHROMEDRIVER:
        return "no chromium / chromedriver on PATH: install Debian's chromium and chromium-driver"
    for module in ("selenium", "jupyterlab"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed: pip install -e '.[dev]'"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on 127.0.0.1 over a temporary copy of the notebooks, with a smoke checkpoint in
    its runs folder for 04_chat. Yields (url, token, work folder, screenshot folder)."""
    work = tmp_path_factory.mktemp("lab")
    shots = tmp_path_factory.mktemp("screenshots")
    runs = work / "runs"
    for name in ("01_wikitext.ipynb", "04_chat.ipynb"):
        shutil.copy(ROOT / "notebooks" / name, work / name)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kernel's inline backend draws plots
    env.update(NEWLLM_SMOKE="1", NEWLLM_RUNS_DIR=str(runs), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               JUPYTER_RUNTIME_DIR=str(work / ".runtime"), JUPYTERLAB_WORKSPACES_DIR=str(work / ".workspaces"),
               JUPYTERLAB_SETTINGS_DIR=str(work / ".settings"))
    # Every cell stays in the page (no virtual scrolling), so a check of the page sees every output.
    settings = work / ".settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    news = work / ".settings" / "@jupyterlab" / "apputils-extension"  # no "get Jupyter news?" pop-up
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    # 04_chat's checkpoint: a smoke Dolly model, trained through the package where 02_dolly would put it.
    subprocess.run([sys.executable, "-c", (
        "import sys; from newllm_nb.config import preset, shrink_for_smoke; "
        "from newllm_nb.experiments.experiment import run_experiment; "
        "run_experiment(shrink_for_smoke(preset('original_dolly', train__epochs=1, train__batch_size=32, "
        "train__show_progress=False)), sys.argv[1])"), str(runs / "dolly-browser-test")],
        env=env, check=True, capture_output=True, timeout=300)
    port, token = _free_port(), secrets.token_hex(16)
    log = open(work / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}", "--ServerApp.allow_root=True",
         "--LabApp.expose_app_in_browser=True", "--ServerApp.open_browser=False"],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log_text = (work / "jupyterlab.log").read_text()[-3000:]
                    raise RuntimeError("JupyterLab did not start:\n" + log_text) from None
                time.sleep(0.5)
        print(f"\nbrowser test: screenshots in {shots}")
        yield url, token, work, shots
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1400"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


# -- JupyterLab through its app object (exposed by --LabApp.expose_app_in_browser) ---------------------------------
PANEL = "const app = window.jupyterapp; const panel = app && app.shell.currentWidget;"


def _wait(driver, js: str, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(js)
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _open(driver, url: str, token: str, name: str) -> None:
    driver.get(f"{url}/lab/tree/{name}?token={token}&reset")
    _wait(driver, PANEL + f"""return !!(panel && panel.context && panel.context.path === '{name}' &&
          panel.sessionContext.session && panel.sessionContext.session.kernel &&
          panel.sessionContext.session.kernel.status === 'idle');""", 90, f"{name} to open with an idle kernel")


def _run(driver, command: str, timeout: float, what: str) -> None:
    driver.execute_script(PANEL + f"app.commands.execute('{command}');")
    time.sleep(1.0)
    _wait(driver, PANEL + """const cells = panel.content.widgets.filter(c => c.model.type === 'code');
          const failed = cells.some(c => c.model.outputs.toJSON().some(o => o.output_type === 'error'));
          return panel.sessionContext.session.kernel.status === 'idle' &&
                 cells.every(c => c.model.executionState !== 'running') &&
                 (failed || cells.every(c => c.model.executionCount !== null));""",
          timeout, what)


def _run_cell(driver, source_part: str, timeout: float) -> None:
    index = driver.execute_script(PANEL + "return panel.content.widgets.findIndex("
                                  f"c => c.model.sharedModel.getSource().includes({json.dumps(source_part)}));")
    assert index >= 0, f"no cell holds {source_part!r}"
    driver.execute_script(PANEL + f"panel.content.activeCellIndex = {index}; panel.content.deselectAll();")
    _run(driver, "notebook:run-cell", timeout, f"the cell with {source_part!r}")


def _cell_text(driver, source_part: str) -> str:
    """The text of a cell's outputs, as the notebook model holds them."""
    return driver.execute_script(PANEL + f"""
        const cell = panel.content.widgets.find(
            c => c.model.sharedModel.getSource().includes({json.dumps(source_part)}));
        return JSON.stringify(cell.model.outputs.toJSON());""")


def _assert_clean(driver, name: str) -> None:
    """No error output, no traceback in any output, and no widget that failed to display."""
    outputs = json.loads(driver.execute_script(PANEL + """
        return JSON.stringify(panel.content.widgets.filter(c => c.model.type === 'code')
                              .map(c => c.model.outputs.toJSON()));"""))
    for i, cell in enumerate(outputs):
        for out in cell:
            assert out.get("output_type") != "error", f"{name} code cell {i}: {out.get('ename')}: {out.get('evalue')}"
            assert "Traceback" not in json.dumps(out), f"{name} code cell {i} printed a traceback: {out}"
    page = driver.execute_script("return document.body.innerText;")
    assert "Error displaying widget" not in page, f"{name}: a widget output failed to display"
    assert "Traceback" not in page, f"{name}: the page shows a traceback"


def _screenshots(driver, shots: Path, stem: str) -> list[Path]:
    """The notebook, viewport by viewport from the top."""
    paths = []
    scroller = PANEL + "const s = panel.content.outerNode || panel.content.node;"
    # The content's height: up to the last cell's bottom (the notebook adds blank room below it).
    height = int(driver.execute_script(scroller + """s.scrollTop = 0; const cells = panel.content.widgets;
        return cells[cells.length - 1].node.getBoundingClientRect().bottom - s.getBoundingClientRect().top + 20;"""))
    view = int(driver.execute_script(scroller + "return s.clientHeight;"))
    step = max(view - 80, 200)
    tops = list(range(0, max(height - view, 0) + 1, step))
    if tops[-1] < height - view:
        tops.append(height - view)
    for k, top in enumerate(tops):
        driver.execute_script(scroller + f"s.scrollTop = {top};")
        time.sleep(0.4)
        path = shots / f"{stem}-{k + 1:02d}.png"
        driver.save_screenshot(str(path))
        paths.append(path)
        if k >= 11:
            break
    print(f"screenshots of {stem}: {shots}/{stem}-*.png ({len(paths)})")
    return paths


def _set_slider(driver, label: str, value: int) -> None:
    """Type ``value`` into the readout of the slider described ``label``, as a user can."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    sliders = [s for s in driver.find_elements(By.CSS_SELECTOR, ".widget-slider")
               if s.find_element(By.CSS_SELECTOR, ".widget-label").text.strip() == label]
    assert sliders, f"no slider labelled {label!r} on the page"
    readout = sliders[0].find_element(By.CSS_SELECTOR, ".widget-readout")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", readout)
    readout.click()
    readout.send_keys(Keys.CONTROL, "a")
    readout.send_keys(str(value), Keys.ENTER)
    time.sleep(1.0)  # the widget syncs its model
    assert readout.text.strip() == str(value), f"slider {label!r} shows {readout.text!r}, not {value}"


def test_wikitext_notebook_in_the_browser(lab, browser):
    url, token, work, shots = lab
    _open(browser, url, token, "01_wikitext.ipynb")
    _run(browser, "notebook:run-all-cells", 420, "01_wikitext to run all cells")
    _assert_clean(browser, "01_wikitext")
    train = _cell_text(browser, "result = train_live(")
    assert "epochs 2 |" in train, "smoke mode trains 2 epochs by default: " + train[-600:]
    growth = _cell_text(browser, "curves, gap = grow_live(")
    for variant in ("no growth (1/4)", "grow, freeze base (2/4)", "grow, fine-tune all (3/4)", "from scratch (4/4)"):
        assert f"{variant} · epochs" in growth, f"growth progress bars are not labelled {variant!r}"

    # A slider changed by hand reaches the next run: 1 epoch instead of smoke mode's 2.
    _set_slider(browser, "max epochs", 1)
    _run_cell(browser, "result = train_live(", 240)
    _run_cell(browser, "from newllm_nb.notebook.live import text_table\n\nm = result.metrics", 30)
    assert "epochs 1 |" in _cell_text(browser, "result = train_live("), "the changed slider did not reach the run"
    assert re.search(r"epochs</td><td[^>]*>1</td>", _cell_text(browser, "m = result.metrics")), "evaluation table"
    _assert_clean(browser, "01_wikitext after the slider change")

    # Saved and reloaded: every widget output still displays (closed progress bars left nothing behind).
    _run(browser, "docmanager:save", 30, "01_wikitext to save")
    browser.refresh()
    _wait(browser, PANEL + "return !!(panel && panel.content && panel.content.widgets.length > 5);", 90,
          "01_wikitext to reopen")
    time.sleep(5)
    _assert_clean(browser, "01_wikitext after a page reload")
    _screenshots(browser, shots, "01_wikitext")


def test_chat_notebook_in_the_browser(lab, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, token, work, shots = lab
    _open(browser, url, token, "04_chat.ipynb")
    _run(browser, "notebook:run-all-cells", 240, "04_chat to run all cells")
    _assert_clean(browser, "04_chat")
    assert "browser-test" in _cell_text(browser, "model, tokenizer, ckpt = load_model("), "the test's checkpoint"

    box = browser.find_element(By.CSS_SELECTOR, "input[placeholder='Ask something, then press Enter']")
    transcript = box.find_element(By.XPATH, "ancestor::div[contains(@class, 'widget-vbox')][1]")
    assert "conversation starts here" in transcript.text, "the chat panel does not start clean: " + transcript.text
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.click()
    box.send_keys("Name three birds that live by rivers.", Keys.ENTER)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "model:" not in transcript.text:
        time.sleep(0.5)
    time.sleep(2)
    text = transcript.text
    assert "you: Name three birds that live by rivers." in text, "Enter did not send the message: " + text
    reply = text.split("model:", 1)[1].strip() if "model:" in text else ""
    assert reply, "no reply appeared in the transcript: " + text
    assert "river otter" not in text, "the demo prompts' turns leaked into the user's conversation"
    assert box.get_attribute("value") == "", "the text box keeps the sent message"
    _assert_clean(browser, "04_chat after chatting")
    _screenshots(browser, shots, "04_chat")
