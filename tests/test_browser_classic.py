"""All five notebooks in classic Notebook 6 with ipywidgets 7: the front end Colab renders.

Runs in the Colab lane (``.ci/colab-lane``: notebook 6.5.7, ipywidgets 7.7.1, widgetsnbextension 3.6.10,
ipykernel 6.17.1, ipython 7.34.0 from ``.ci/colab-constraints.txt``), where headless Chromium opens each
notebook in smoke mode, runs every cell, and checks what the page shows: no widget error and no traceback
in any output, progress bars drawn as bars, the live plot redrawn while training runs, a changed slider
reaching the next run, the chat sending on Enter and streaming into a bounded box, and after saving and
reloading the page nothing saying "model not found". Screenshots go to a temporary folder whose path is
printed.

Skipped (with the reason) outside that lane: it needs classic Notebook < 7 and ipywidgets 7, plus Debian's
``chromium`` and ``chromium-driver`` and ``selenium``.
"""

from __future__ import annotations

import json
import os
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
NOTEBOOKS = ["00_setup", "01_wikitext", "02_dolly", "03_layer_sweep", "04_chat"]
WIDGET_ERRORS = ("Error displaying widget", "model not found", "widget state could not be found",
                 "Error rendering Jupyter widget", "IProgress not found")


def _skip_reason() -> str | None:
    if os.environ.get("NEWLLM_BROWSER_SKIP"):
        return os.environ["NEWLLM_BROWSER_SKIP"]
    if not CHROMIUM or not CHROMEDRIVER:
        return "no chromium / chromedriver on PATH: install Debian's chromium and chromium-driver"
    try:
        import ipywidgets
        import notebook
        import selenium  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed: the Colab lane (.ci/colab-lane) installs this test's packages"
    if int(notebook.__version__.split(".")[0]) >= 7 or int(ipywidgets.__version__.split(".")[0]) >= 8:
        return (f"classic Notebook 6 with ipywidgets 7 (Colab's front end) is the Colab lane's; here notebook "
                f"{notebook.__version__}, ipywidgets {ipywidgets.__version__}")
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Classic Notebook on 127.0.0.1 over a temporary copy of the five notebooks and one runs folder (04_chat
    finds the checkpoint 02_dolly wrote). Yields (url, token, work folder, screenshot folder)."""
    work = tmp_path_factory.mktemp("classic")
    shots = Path(os.environ.get("NEWLLM_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    for name in NOTEBOOKS:
        shutil.copy(ROOT / "notebooks" / f"{name}.ipynb", work / f"{name}.ipynb")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kernel's inline backend draws plots
    env.update(NEWLLM_SMOKE="1", NEWLLM_RUNS_DIR=str(work / "runs"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               JUPYTER_RUNTIME_DIR=str(work / ".runtime"), PYTHONPATH=str(ROOT))
    port, token = _free_port(), secrets.token_hex(16)
    log = open(work / "notebook.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "notebook", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--NotebookApp.token={token}", f"--NotebookApp.notebook_dir={work}", "--allow-root"],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("Notebook did not start:\n" + (work / "notebook.log").read_text()[-3000:]) \
                        from None
                time.sleep(0.5)
        print(f"\nclassic notebook browser test: screenshots in {shots}")
        yield url, token, work, shots
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # A closed network: nothing that phones home, a profile of its own.
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1280,1400"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


# -- classic Notebook through its page object (window.Jupyter) ---------------------------------------------------
NB = "const nb = window.Jupyter && Jupyter.notebook;"
CODE = NB + "const cells = nb.get_cells().filter(c => c.cell_type === 'code');"


def _wait(driver, js: str, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(js)
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}: {_state(driver)}")


def _state(driver) -> str:
    """Where a notebook's run stands: each code cell's prompt, and the running cell's last output."""
    try:
        return _state_js(driver)
    except Exception as e:  # the page is not a notebook (yet)
        return f"no notebook state ({type(e).__name__})"


def _state_js(driver) -> str:
    return driver.execute_script(CODE + """
        const running = cells.find(c => c.element.hasClass('running'));
        const prompts = cells.map(c => c.element.hasClass('running') ? '*' : String(c.input_prompt_number));
        return 'prompts [' + prompts.join(' ') + ']' + (running ? '; running cell: ' +
               running.get_text().slice(0, 80) + ' -> ' + JSON.stringify(running.output_area.outputs).slice(-600) : '');
    """)


def _idle(driver, timeout: float, what: str) -> None:
    """Every code cell finished (or the run stopped at an error) and the kernel is idle."""
    _wait(driver, CODE + """
        const failed = cells.some(c => c.output_area.outputs.some(o => o.output_type === 'error'));
        const idle = !!document.querySelector('#kernel_indicator_icon.kernel_idle_icon');
        return idle && cells.every(c => !c.element.hasClass('running')) &&
               (failed || cells.every(c => typeof c.input_prompt_number === 'number'));""", timeout, what)


def _open(driver, url: str, token: str, name: str) -> None:
    driver.get(f"{url}/notebooks/{name}.ipynb?token={token}")
    _wait(driver, NB + """return !!(nb && nb._fully_loaded && nb.kernel && nb.kernel.is_connected() &&
          document.querySelector('#kernel_indicator_icon.kernel_idle_icon'));""", 120, f"{name} to open with a kernel")


def _cell_index(driver, source_part: str) -> int:
    index = driver.execute_script(NB + f"return nb.get_cells().findIndex(c => c.get_text().includes("
                                  f"{json.dumps(source_part)}));")
    assert index >= 0, f"no cell holds {source_part!r}"
    return index


def _run_cell(driver, source_part: str, timeout: float) -> None:
    i = _cell_index(driver, source_part)
    driver.execute_script(NB + f"const c = nb.get_cell({i}); c.input_prompt_number = null; c.execute();")
    time.sleep(1.0)
    _wait(driver, NB + f"""const c = nb.get_cell({i});
          return !c.element.hasClass('running') && typeof c.input_prompt_number === 'number' &&
                 !!document.querySelector('#kernel_indicator_icon.kernel_idle_icon');""",
          timeout, f"the cell with {source_part!r}")


def _outputs(driver, source_part: str) -> str:
    i = _cell_index(driver, source_part)
    return driver.execute_script(NB + f"return JSON.stringify(nb.get_cell({i}).output_area.outputs);")


def _assert_clean(driver, name: str) -> None:
    """No error output, no traceback in any output, no widget that failed to display."""
    outputs = json.loads(driver.execute_script(CODE + "return JSON.stringify(cells.map(c => c.output_area.outputs));"))
    for i, cell in enumerate(outputs):
        for out in cell:
            assert out.get("output_type") != "error", f"{name} code cell {i}: {out.get('ename')}: {out.get('evalue')}"
            text = json.dumps(out)
            assert "Traceback" not in text, f"{name} code cell {i} printed a traceback: {text[:2000]}"
            for bad in WIDGET_ERRORS:
                assert bad not in text, f"{name} code cell {i} says {bad!r}: {text[:2000]}"
    page = driver.execute_script("return document.getElementById('notebook').innerText;")
    for bad in WIDGET_ERRORS + ("Traceback",):
        assert bad not in page, f"{name}: the page says {bad!r}"


def _assert_bars_drawn(driver, name: str, label: str) -> None:
    """The progress bars are ipywidgets bars (not tqdm's text fallback), labelled, and filled."""
    bars = driver.execute_script("""
        return [...document.querySelectorAll('#notebook .widget-hprogress')].map(p => {
            const row = p.closest('.widget-hbox'), fill = p.querySelector('.progress-bar');
            return {text: row ? row.innerText.replace(/[\u2007\u00a0]/g, ' ') : '',
                    fill: fill ? fill.getBoundingClientRect().width : 0,
                    width: p.getBoundingClientRect().width};
        });""")
    labelled = [b for b in bars if label in b["text"]]
    assert labelled, f"{name}: no progress bar labelled {label!r} (bars: {[b['text'] for b in bars][:6]})"
    assert all(b["width"] > 50 and b["fill"] > 0 for b in labelled), f"{name}: a bar is not drawn: {labelled[:3]}"


def _watch_plot(driver, source_part: str) -> None:
    """Record every image the cell's output shows from now on, and whether the cell was still running."""
    i = _cell_index(driver, source_part)
    driver.execute_script(NB + f"""const c = nb.get_cell({i}); window.__plots = [];
        const seen = () => c.output_area.element[0].querySelectorAll('img').forEach(img => {{
            const key = img.src.length + ':' + img.src.slice(-64);
            if (!window.__plots.some(p => p.key === key))
                window.__plots.push({{key: key, running: c.element.hasClass('running')}});
        }});
        new MutationObserver(seen).observe(c.output_area.element[0],
                                           {{subtree: true, childList: true, attributes: true}});""")


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


def _screenshots(driver, shots: Path, stem: str, limit: int = 12) -> None:
    """The notebook, viewport by viewport from the top."""
    height = int(driver.execute_script("const s = document.getElementById('site'); s.scrollTop = 0; "
                                       "return document.getElementById('notebook-container').scrollHeight;"))
    view = int(driver.execute_script("return document.getElementById('site').clientHeight;"))
    step = max(view - 80, 200)
    for k, top in enumerate(range(0, max(height - view, 0) + step, step)):
        if k >= limit:
            break
        driver.execute_script(f"document.getElementById('site').scrollTop = {top};")
        time.sleep(0.3)
        driver.save_screenshot(str(shots / f"{stem}-{k + 1:02d}.png"))
    print(f"screenshots of {stem}: {shots}/{stem}-*.png")


def _save_reload_check(driver, name: str) -> None:
    """Saved and reloaded: every widget output still displays or is gone (closed bars leave nothing)."""
    driver.execute_script(NB + "nb.save_notebook();")
    _wait(driver, NB + "return !nb.dirty;", 30, f"{name} to save")
    driver.refresh()
    _wait(driver, NB + "return !!(nb && nb._fully_loaded && nb.kernel && nb.kernel.is_connected());", 120,
          f"{name} to reopen")
    time.sleep(5)  # the widget manager re-renders the views it can
    _assert_clean(driver, f"{name} after a page reload")


def _run_all(driver, url, token, name, timeout, live_plot: str | None = None) -> None:
    """Open ``name``, run every cell, check every output; with ``live_plot`` (a part of the training cell's
    source), also that the cell's plot was redrawn at least twice while the cell was still running."""
    _open(driver, url, token, name)
    if live_plot:
        _watch_plot(driver, live_plot)
    driver.execute_script(NB + "nb.execute_all_cells();")
    time.sleep(1.0)
    _idle(driver, timeout, f"{name} to run all cells")
    _assert_clean(driver, name)
    if live_plot:
        plots = driver.execute_script("return window.__plots;")
        assert sum(p["running"] for p in plots) >= 2, f"{name}: the live plot was not redrawn while training ran: " \
            f"{plots}"


def test_the_checks_see_a_widget_that_cannot_display(server, browser):
    """The page checks can fail: a widget view whose model the kernel does not hold makes this front end say so
    ("widget state could not be found"), before and after a reload, and _assert_clean reports it."""
    import nbformat

    url, token, work, shots = server
    view = {"application/vnd.jupyter.widget-view+json": {"version_major": 2, "version_minor": 0,
                                                         "model_id": "0" * 32}, "text/plain": "a lost widget"}
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        f"from IPython.display import display\ndisplay({view!r}, raw=True)")])
    nbformat.write(nb, work / "lost_widget.ipynb")
    with pytest.raises(AssertionError, match="widget state could not be found"):
        _run_all(browser, url, token, "lost_widget", 120)
    with pytest.raises(AssertionError, match="widget state could not be found"):
        _save_reload_check(browser, "lost_widget")


def test_setup_notebook_in_classic_notebook(server, browser):
    url, token, work, shots = server
    _run_all(browser, url, token, "00_setup", 240)
    _save_reload_check(browser, "00_setup")
    _screenshots(browser, shots, "00_setup", limit=3)


def test_wikitext_notebook_in_classic_notebook(server, browser):
    url, token, work, shots = server
    train_cell = "result = train_live("
    _run_all(browser, url, token, "01_wikitext", 1500, live_plot=train_cell)
    assert "epochs 2 |" in _outputs(browser, train_cell), "smoke mode trains 2 epochs by default"
    _assert_bars_drawn(browser, "01_wikitext", "New-LLM on WikiText-2")
    growth = _outputs(browser, "curves, gap = grow_live(")
    for variant in ("no growth (1/4)", "grow, freeze base (2/4)", "grow, fine-tune all (3/4)", "from scratch (4/4)"):
        assert f"{variant} · epochs" in growth, f"growth progress bars are not labelled {variant!r}"
    _screenshots(browser, shots, "01_wikitext")

    # A slider changed by hand reaches the next run: 1 epoch instead of smoke mode's 2.
    _set_slider(browser, "max epochs", 1)
    _run_cell(browser, train_cell, 300)
    assert "epochs 1 |" in _outputs(browser, train_cell), "the changed slider did not reach the run"
    _assert_clean(browser, "01_wikitext after the slider change")
    _save_reload_check(browser, "01_wikitext")


def test_dolly_notebook_in_classic_notebook(server, browser):
    url, token, work, shots = server
    _run_all(browser, url, token, "02_dolly", 900, live_plot="result = train_live(")
    assert "| data: " in _outputs(browser, "result = train_live(")  # the summary names its data
    _assert_bars_drawn(browser, "02_dolly", "New-LLM on Dolly-15k")
    _save_reload_check(browser, "02_dolly")
    _screenshots(browser, shots, "02_dolly", limit=6)


def test_layer_sweep_notebook_in_classic_notebook(server, browser):
    url, token, work, shots = server
    _run_all(browser, url, token, "03_layer_sweep", 1500, live_plot="results = sweep_live(")
    by_option = _outputs(browser, "by_option = option_sweep_live(")
    for label in ("state_norm=layernorm (1/2) · newllm, 1 layer", "state_norm=noaffine (2/2) · newllm, 1 layer"):
        assert label in by_option, f"the option sweep's bars do not name {label!r}"
    _assert_bars_drawn(browser, "03_layer_sweep", "newllm, 4 layers (run 2/5)")
    _save_reload_check(browser, "03_layer_sweep")
    _screenshots(browser, shots, "03_layer_sweep", limit=6)


def test_chat_notebook_in_classic_notebook(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, token, work, shots = server
    _run_all(browser, url, token, "04_chat", 600)
    loaded = _outputs(browser, "model, tokenizer, ckpt = load_model(")
    assert "loaded " in loaded and "/runs/dolly-" in loaded, "02_dolly's checkpoint was not loaded: " + loaded[-600:]

    box = browser.find_element(By.CSS_SELECTOR, "input[placeholder='Ask something, then press Enter']")
    transcript = box.find_element(By.XPATH, "ancestor::div[contains(@class, 'widget-vbox')][1]")
    assert "conversation starts here" in transcript.text, "the chat panel does not start clean: " + transcript.text
    # Every change of the transcript while the reply streams, and the transcript box's own bounds.
    browser.execute_script("""const t = arguments[0]; window.__chat = [];
        new MutationObserver(() => window.__chat.push(t.innerText)).observe(t, {subtree: true, childList: true,
                                                                             characterData: true});""", transcript)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.click()
    box.send_keys("Name three birds that live by rivers.", Keys.ENTER)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "model:" not in transcript.text:
        time.sleep(0.5)
    time.sleep(3)
    text = transcript.text
    assert "you: Name three birds that live by rivers." in text, "Enter did not send the message: " + text
    reply = text.split("model:", 1)[1].strip() if "model:" in text else ""
    assert reply, "no reply appeared in the transcript: " + text
    # Streamed: the page showed the reply growing, in at least two partial states before the whole of it.
    partial = {s.split("model:", 1)[1].strip() for s in browser.execute_script("return window.__chat;")
               if "model:" in s} - {"", reply}
    assert sum(reply.startswith(p) for p in partial) >= 2, \
        f"the reply did not stream: the page never showed it part-way (states: {sorted(partial)[:5]}, final {reply!r})"
    bounded = browser.execute_script("""return [...arguments[0].querySelectorAll('div')].some(d => {
        const s = getComputedStyle(d); return s.maxHeight !== 'none' && s.overflowY === 'auto'; });""", transcript)
    assert bounded, "the transcript is not a bounded, scrolling box"
    assert box.get_attribute("value") == "", "the text box keeps the sent message"
    _assert_clean(browser, "04_chat after chatting")
    _screenshots(browser, shots, "04_chat", limit=6)
    _save_reload_check(browser, "04_chat")
