"""Fixtures for skysnap's browser test of the profiling page (web/index.html, web/app.js).

Drives the page in the system Chromium (Debian's `chromium` package, /usr/bin/chromium)
through Playwright's Python client; Playwright's own browser download is never used.
The backend is the real `skysnap serve` (SKYSNAP_BIN or target/debug/skysnap) on loopback
ports with a fresh SQLite file, fed by the real SkyWalking Python agent (tests/e2e/app.py).
The page is tested only through the DOM contract (ids and classes) it promises.

Run with a python that has apache-skywalking==1.2.0, pytest and playwright, e.g.

    SKYSNAP_BIN=target/debug/skysnap .venv-browser/bin/python -m pytest -p no:cacheprovider tests/browser -v -s
"""

import importlib.util
import os
import re
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SHOTS = os.path.join(REPO, 'target', 'browser-shots')
DOC_SHOTS = os.path.join(REPO, 'docs', 'screenshots')
CHROMIUM = os.environ.get('SKYSNAP_TEST_CHROMIUM', '/usr/bin/chromium')

# The process helpers (Skysnap, App, wait_for, ...) of the end-to-end test, loaded under
# their own module name so that the two conftest files never shadow each other.
_spec = importlib.util.spec_from_file_location(
    'skysnap_e2e_helpers', os.path.join(REPO, 'tests', 'e2e', 'conftest.py'))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

# Chromium logs every non-2xx fetch as a console error ("Failed to load resource: ...").
# The test provokes exactly these on purpose (the invalid task -> 400, the token flow -> 401,
# a segment whose trace segment was not kept -> 404 from /api/v1/segments/{id});
# anything else on the console at level "error" fails the test.
EXPECTED_CONSOLE = re.compile(
    r'^Failed to load resource: the server responded with a status of (400|401) ')
EXPECTED_404 = re.compile(
    r'^Failed to load resource: the server responded with a status of 404 ')
KEPT_SEGMENT_URL = re.compile(r'^https?://[^/]+/api/v1/segments/[^/?#]+$')


def expected_console_error(text, location):
    if EXPECTED_CONSOLE.match(text):
        return True
    return bool(EXPECTED_404.match(text) and KEPT_SEGMENT_URL.match((location or {}).get('url', '')))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, 'rep_' + rep.when, rep)


@pytest.fixture(scope='session')
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f'{CHROMIUM} not found: apt-get install chromium chromium-driver '
                    f'(scripts/test.sh does this)')
    from playwright.sync_api import sync_playwright
    if os.path.isdir(SHOTS):  # failure shots of an earlier run would mislead
        for name in os.listdir(SHOTS):
            if name.startswith('failure-'):
                os.remove(os.path.join(SHOTS, name))
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'])
        try:
            yield b
        finally:
            b.close()


class Pages:
    """Opens pages at 1280x800 and records page errors and console errors of each."""

    def __init__(self, browser):
        self.browser = browser
        self.contexts = []
        self.pages = []  # (label, page)
        self.errors = []  # (page label, kind, text)

    def new(self, label):
        ctx = self.browser.new_context(viewport={'width': 1280, 'height': 800})
        self.contexts.append(ctx)
        page = ctx.new_page()
        self.pages.append((label, page))
        page.set_default_timeout(20_000)
        page.on('pageerror', lambda e: self.errors.append((label, 'pageerror', str(e))))

        def on_console(msg):
            if msg.type == 'error' and not expected_console_error(msg.text, msg.location):
                self.errors.append((label, 'console.error', f'{msg.text} @ {msg.location}'))
        page.on('console', on_console)
        return page

    def failure_shots(self):
        """Full-page screenshots of every open page, for a failed test."""
        os.makedirs(SHOTS, exist_ok=True)
        for label, page in self.pages:
            path = os.path.join(SHOTS, f'failure-{label}.png')
            try:
                page.screenshot(path=path, full_page=True)
                print(f'\n[browser] failure screenshot {path} (url {page.url})')
            except Exception as e:  # noqa: BLE001
                print(f'\n[browser] no failure screenshot of {label}: {e}')

    def close(self):
        for ctx in self.contexts:
            try:
                ctx.close()
            except Exception:  # noqa: BLE001
                pass


@pytest.fixture
def pages(browser, request):
    p = Pages(browser)
    try:
        yield p
    finally:
        rep = getattr(request.node, 'rep_call', None)
        if rep is None or rep.failed:
            p.failure_shots()
        if p.errors:
            print('\n[browser] page/console errors:' + ''.join(f'\n    {e}' for e in p.errors))
        p.close()


@pytest.fixture
def env(request):
    """skysnap servers and agent apps for one test, all stopped at teardown (apps first)."""
    with tempfile.TemporaryDirectory(prefix='skysnap-browser-') as workdir:
        e = helpers._Env(workdir)
        try:
            yield e
        finally:
            for a in e.apps:
                a.stop(timeout=10)
            rcs = [(s, s.stop(timeout=20)) for s in e.skysnaps]
            rep = getattr(request.node, 'rep_call', None)
            if rep is None or rep.failed or any(rc != 0 for _, rc in rcs):
                for p in e.apps + e.skysnaps:
                    tail = '\n'.join(p.log_text().splitlines()[-80:])
                    print(f'\n===== {p.name} (exit {p.returncode}) stderr, last 80 lines =====\n{tail}')
            for s, rc in rcs:
                assert rc == 0, f'skysnap exited with {rc} after SIGTERM (expected 0)'
