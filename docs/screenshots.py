"""Screenshots of what a user sees in the MLflow UI after `mdpo-ray train` and `mdpo-ray sweep sweeps/smoke.yaml`.

    pip install -e '.[docs]'        # playwright (its own browser download is not needed)
    apt-get install -y chromium     # a system Chromium (Debian's; or pass --chromium PATH)
    python docs/screenshots.py      # the runs, then docs/img/*.png and docs/img/shots.json

Runs the two commands as a user does, in `--workdir` (default: the repository root), unless their runs
are already in its store `mdpo_runs/mlflow.db`; starts `mlflow ui` on 127.0.0.1 over that store; and
opens, in headless Chromium driven by Playwright, what the README points a user to: the run's overview,
its first charts, its rewards charts and its system metrics, the sweep's runs table with its trials
unfolded, their charts compared, and the sweep's report (the parent run's `report/trials.html`
artifact). Each page is captured only once what it is taken for has drawn and no spinner is left in the
window (a plain `chromium --screenshot` catches the spinners); a page that never gets there fails the
script, naming it, with a screenshot of how far it got. `--set KEY=VALUE` goes to both commands (the
tests make a few-step run); shots.json says what each page showed: its drawn charts and its text.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
SWEEP_FILE = ROOT / "sweeps" / "smoke.yaml"
STORE = "mdpo_runs"  # output_dir's default, relative to where mdpo-ray runs; mlflow.db is in it
DEFAULT_EXPERIMENT, SWEEP_EXPERIMENT = "mdpo-ray", "smoke"  # tracking.experiment's default; a sweep's is its name
# Without these Chromium waits on the network (updates, sync, field trials) and never settles offline.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1440, "height": 900}
PAGE_TIMEOUT_MS = 120_000  # the UI is slow to draw on a busy 2-core machine
SELECT, SELECTED = ".du-bois-light-select", ".du-bois-light-select-selection-item"  # a multi-select, a chosen item
NO_CHARTS = "No charts in this section"  # the UI's empty section
CARD = "[data-testid=draggable-chart-cards-grid] > *"  # a chart card: title, plot, legend
DRAWN_CHART_TEXTS = r"""() => [...document.querySelectorAll('.js-plotly-plot')]
    .filter(plot => plot.querySelector('.main-svg'))
    .map(plot => plot.closest('[data-testid=draggable-chart-cards-grid] > *')).filter(Boolean)
    .map(card => card.innerText.split('\n').filter(line => /[a-z]/i.test(line)))"""
# MLflow's UI kit draws its loading states with these classes; some stay in the DOM, hidden, off-screen or
# under the sticky header (a chart above the window that has not loaded, since it is not in view).
SPINNERS_IN_WINDOW = """() => [...document.querySelectorAll(
    '.du-bois-light-spin-spinning, .du-bois-light-skeleton, [role=progressbar]')].filter(e => {
    const r = e.getBoundingClientRect(), x = r.left + r.width / 2, y = r.top + r.height / 2;
    return x > 0 && y > 0 && x < innerWidth && y < innerHeight  // its middle on screen, not under another element
        && e.checkVisibility({opacityProperty: true, visibilityProperty: true})
        && e.contains(document.elementFromPoint(x, y)); })
    .map(e => `${e.className} at ${Math.round(e.getBoundingClientRect().left)},${Math.round(e.getBoundingClientRect().top)}`)"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT, help="where the commands run, their store being "
                        f"WORKDIR/{STORE} (default: the repository root, as the README runs them)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                        help="the Chromium executable (default: chromium on PATH)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override for the run and the sweep's trials (repeatable)")
    args = parser.parse_args(argv)
    if not args.chromium:
        parser.error("no Chromium found: apt-get install -y chromium, or pass --chromium PATH")
    workdir = args.workdir.resolve()
    ids = build_store(workdir, args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mdpo-shots-") as scratch, \
            mlflow_ui(workdir / STORE / "mlflow.db", Path(scratch)) as url:
        shown = capture(url, ids, args.out, args.chromium)
    (args.out / "shots.json").write_text(json.dumps(shown, indent=1, ensure_ascii=False) + "\n")
    for name, page in shown.items():
        print(f"{args.out / name}: {page['bytes'] // 1024} KiB, {page['url']}")
    return 0


def build_store(workdir: Path, overrides: list[str]) -> dict:
    """The default run and the smoke sweep in workdir's store (each run only if it is not there yet)."""
    from mlflow.tracking import MlflowClient

    sets = [arg for override in overrides for arg in ("--set", override)]
    uri = f"sqlite:///{workdir / STORE / 'mlflow.db'}"
    if _newest_finished(uri, DEFAULT_EXPERIMENT) is None:
        _mdpo(["train", *sets], workdir)
    if _newest_finished(uri, SWEEP_EXPERIMENT, "tags.`mdpo.role` = 'sweep'") is None:
        sweep = SWEEP_FILE.relative_to(workdir) if SWEEP_FILE.is_relative_to(workdir) else SWEEP_FILE
        # An interrupted sweep left its Tune state (output_dir/<sweep>/tune/<sweep>): continue it.
        resume = ["--resume"] if (workdir / STORE / SWEEP_EXPERIMENT / "tune" / SWEEP_EXPERIMENT).exists() else []
        _mdpo(["sweep", str(sweep), *resume, *sets], workdir)
    run = _newest_finished(uri, DEFAULT_EXPERIMENT)
    parent = _newest_finished(uri, SWEEP_EXPERIMENT, "tags.`mdpo.role` = 'sweep'")
    if run is None or parent is None:
        raise SystemExit(f"{uri} lacks a FINISHED default run or smoke sweep: see {workdir / STORE}/*.log")
    children = MlflowClient(tracking_uri=uri).search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return {"experiment": run.info.experiment_id, "run": run.info.run_id, "sweep_experiment": parent.info.experiment_id,
            "parent": parent.info.run_id, "parent_name": parent.info.run_name,
            "children": sorted(child.info.run_name for child in children),
            "children_ids": [child.info.run_id for child in children],
            "search_keys": parent.data.tags["mdpo.search_keys"].split(","), "metric": parent.data.tags["mdpo.metric"]}


def _newest_finished(uri: str, experiment: str, query: str = ""):
    from mlflow.tracking import MlflowClient

    if not Path(uri.removeprefix("sqlite:///")).exists():
        return None
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], " and ".join(filter(None, [query, "attributes.status = 'FINISHED'"])),
                              order_by=["attributes.start_time DESC"], max_results=1) if found else []
    return runs[0] if runs else None


def _mdpo(command: list[str], workdir: Path) -> None:
    log = workdir / STORE / f"{command[0]}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"mdpo-ray {' '.join(command)}  (in {workdir}; log: {log})", flush=True)
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "mdpo_ray", *command], stdout=out, stderr=subprocess.STDOUT,
                              cwd=workdir, check=False)
    if done.returncode:
        raise SystemExit(f"mdpo-ray {command[0]} failed (exit {done.returncode}); the end of {log}:\n"
                         + log.read_text()[-3000:])
    print(f"  done in {time.monotonic() - started:.0f} s", flush=True)


@contextmanager
def mlflow_ui(db: Path, scratch: Path):
    """`mlflow ui` over the store on a free 127.0.0.1 port; its URL once it answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (scratch / "mlflow-ui.log").open("w")
    # No telemetry (nothing to reach), and none of the GenAI job runners (7 processes, ~240 MB each).
    env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{db}",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT, cwd=scratch, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("mlflow ui did not start:\n" + (scratch / "mlflow-ui.log").read_text()[-3000:])
                time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and whatever it started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def capture(url: str, ids: dict, out: Path, chromium: str) -> dict[str, dict]:
    """Each page as a new user of the UI sees it, once its content has drawn; what each showed."""
    from playwright.sync_api import sync_playwright

    run = f"{url}/#/experiments/{ids['experiment']}/runs/{ids['run']}"
    sweep = f"{url}/#/experiments/{ids['sweep_experiment']}"
    shown: dict[str, dict] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            _first_visit(page, f"{url}/#/experiments/{ids['experiment']}")
            shown["run_overview.png"] = _shot(page, run, out, "run_overview.png",
                                              lambda: page.get_by_test_id("note-view-outer-container")
                                              .get_by_text("minor_dpo").first.wait_for())
            shown["run_charts.png"] = _shot(page, f"{run}/model-metrics", out, "run_charts.png",
                                            lambda: _plots_drawn(page, 4))
            shown["run_rewards.png"] = _shot(page, f"{run}/model-metrics", out, "run_rewards.png",
                                             lambda: _scroll_to_section(page, "rewards", "rewards/margins"))
            shown["run_system_metrics.png"] = _shot(page, f"{run}/system-metrics", out, "run_system_metrics.png",
                                                    lambda: _plots_drawn(page, 1, or_text=NO_CHARTS))
            shown["sweep_runs.png"] = _shot(page, f"{sweep}/runs", out, "sweep_runs.png",
                                            lambda: _expand_sweep(page, ids["parent_name"], ids["children"]))
            shown["sweep_charts.png"] = _shot(page, f"{sweep}/runs?compareRunsMode=CHART", out, "sweep_charts.png",
                                              lambda: _plots_drawn(page, 4))
            shown["sweep_parent.png"] = _shot(page, f"{sweep}/runs/{ids['parent']}", out, "sweep_parent.png",
                                              lambda: page.get_by_test_id("note-view-outer-container")
                                              .get_by_text("Best trial").first.wait_for())
            compare = (f"{url}/#/compare-runs?runs={quote(json.dumps(ids['children_ids']))}"
                       f"&experiments={quote(json.dumps([ids['sweep_experiment']]))}")
            shown["sweep_compare.png"] = _shot(page, compare, out, "sweep_compare.png",
                                               lambda: _compare_on(page, ids["search_keys"], ids["metric"]))
            shown["sweep_report.png"] = _shot(page, f"{sweep}/runs/{ids['parent']}/artifacts/report/trials.html",
                                              out, "sweep_report.png", lambda: _report_shown(page))
        finally:
            browser.close()
    return shown


def _first_visit(page, experiment_url: str) -> None:
    """What a user does once in a new browser: MLflow 3.17 opens on its GenAI pages whatever the
    experiment's kind, until "Model training" is picked in the switch at the top left (it is remembered);
    its assistant panel takes a third of the window until closed (also remembered)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    page.goto(experiment_url)
    switch = page.get_by_text("Model training", exact=True).first
    switch.wait_for()
    # The GenAI overview may open a popover whose mask takes the pointer: send the switch its click. A click
    # sent while the page is still wiring its handlers is lost (seen once in ~10 runs): send it again.
    for _ in range(5):
        switch.dispatch_event("click")
        try:
            page.get_by_text("Runs", exact=True).first.wait_for(timeout=20_000)
            break
        except PlaywrightTimeoutError:
            continue
    else:
        raise SystemExit(f"{experiment_url}: the UI did not switch to 'Model training' after 5 clicks")
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    try:
        close.first.click(timeout=10_000)
    except PlaywrightTimeoutError:
        print("(no MLflow assistant panel to close)")


def _shot(page, url: str, out: Path, name: str, ready) -> dict:
    """Open url, wait for `ready` and for no spinner in the window, capture it as a small palette PNG."""
    page.goto("about:blank")  # a hash change alone would keep the previous page's state
    page.goto(url)
    try:
        ready()
        page.wait_for_function(f"() => ({SPINNERS_IN_WINDOW})().length === 0")
    except Exception as error:
        page.screenshot(path=out / f"failed_{name}")
        raise SystemExit(f"{url}: never showed what {name} is taken for ({error}); the window then is "
                         f"{out / f'failed_{name}'}, spinners in it: {page.evaluate(SPINNERS_IN_WINDOW)}") from error
    page.wait_for_timeout(1000)  # plotly's last redraw
    path = out / name
    page.screenshot(path=path)
    _shrink(path)
    # Each drawn chart card's lines with a letter in them: its title, the axis title, its legend
    # ("<run name> (<metric>)"); tick labels are numbers.
    charts = page.evaluate(DRAWN_CHART_TEXTS)
    return {"url": url, "bytes": path.stat().st_size, "charts": charts, "text": page.inner_text("body")}


def _plots_drawn(page, at_least: int, or_text: str | None = None) -> None:
    """At least `at_least` charts drawn (or, when given, `or_text` shown instead: a run shorter than MLflow's
    10 s sampling interval has no system metrics)."""
    alternative = f" || document.body.innerText.includes({json.dumps(or_text)})" if or_text else ""
    page.wait_for_function(f"() => [...document.querySelectorAll('.js-plotly-plot')]"
                           f".filter(plot => plot.querySelector('.main-svg')).length >= {at_least}{alternative}")


def _scroll_to_section(page, section: str, metric: str) -> None:
    """Scroll the run's charts to a section ("rewards"), as a reader of the page does, and wait until the
    chart of `metric` in it has drawn."""
    page.wait_for_function(f"""() => {{
        const header = [...document.querySelectorAll('[data-testid=experiment-view-compare-runs-section-header]')]
            .find(h => h.textContent.trim().startsWith({json.dumps(section + "(")}));  // "rewards(4)Add chart"
        if (!header) return false;
        header.scrollIntoView({{block: 'start'}});
        const item = header.closest('.du-bois-light-collapse-item');
        return [...item.querySelectorAll('.js-plotly-plot')].some(plot => plot.querySelector('.main-svg')
            && plot.closest({json.dumps(CARD)}).innerText.includes({json.dumps(f"({metric})")}));
    }}""")


def _expand_sweep(page, sweep_name: str, child_names: list[str]) -> None:
    """The runs table shows a sweep as its parent run, its trials folded under it: unfold them."""
    row = page.locator("[role=gridcell]", has=page.get_by_role("link", name=sweep_name, exact=True))
    row.locator("button").first.click()
    for child in child_names:
        page.get_by_role("link", name=child, exact=True).first.wait_for()


def _compare_on(page, keys: list[str], metric: str) -> None:
    """The compare page of the sweep's trials plots every param that differs (`name` too: each trial's own)
    against the first metric; keep the searched keys and plot the sweep's metric, as a user would."""
    params, metrics = page.locator(SELECT).nth(0), page.locator(SELECT).nth(1)
    params.locator(SELECTED).first.wait_for()
    for select, wanted in ((params, set(keys)), (metrics, {metric})):
        while unwanted := [item for item in select.locator(SELECTED).all() if item.inner_text() not in wanted]:
            unwanted[0].locator(f"{SELECTED}-remove").click()
    if not metrics.locator(SELECTED, has_text=metric).count():
        metrics.click()
        page.keyboard.type(metric)
        page.keyboard.press("Enter")
        page.keyboard.press("Escape")
    page.locator(".js-plotly-plot", has_text=metric).first.wait_for()


def _report_shown(page) -> None:
    page.frame_locator("iframe").first.get_by_text("Best trial").first.wait_for()


def _shrink(path: Path) -> None:
    """A screenshot of flat UI colours loses nothing visible in a 256-colour palette, at a third of the size."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    small.save(path, optimize=True)


if __name__ == "__main__":
    sys.exit(main())
