"""Helpers for skysnap's end-to-end tests against the real SkyWalking Python agent.

Only the standard library and pytest are used. Run with the virtualenv's python (the one
that has apache-skywalking==1.2.0 installed), e.g.

    SKYSNAP_BIN=target/debug/skysnap .venv/bin/python -m pytest tests/e2e -v -s
"""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
APP_PY = os.path.join(HERE, 'app.py')
DEFAULT_BIN = os.path.join(REPO, 'target', 'debug', 'skysnap')

READY_RE = re.compile(r'^skysnap ready grpc=(\S+) http=(\S+) metrics=(\S+)$')


def unique(prefix='e2e'):
    return f'{prefix}-{uuid.uuid4().hex[:10]}'


def now_ms():
    return int(time.time() * 1000)


def wait_for(pred, timeout, desc, interval=0.2):
    """Polls pred() until it returns a truthy value; returns it, or fails after timeout s."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() >= deadline:
            pytest.fail(f'timed out after {timeout:.1f}s waiting for {desc}; last value: {last!r}')
        time.sleep(interval)


class _LineReader:
    """Drains a process' stdout in a thread so that lines can be awaited with a timeout."""

    def __init__(self, stream, echo_prefix):
        self.lines = queue.Queue()
        self.all = []
        self._echo_prefix = echo_prefix
        self._t = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._t.start()

    def _run(self, stream):
        for raw in stream:
            line = raw.decode('utf-8', 'replace').rstrip('\n')
            self.all.append(line)
            self.lines.put(line)
        self.lines.put(None)  # EOF

    def wait_line(self, pattern, timeout):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                return None
            m = re.match(pattern, line)
            if m:
                return m


class _Proc:
    name = 'proc'

    def __init__(self, argv, env, cwd, log_path):
        self.log_path = log_path
        self._log = open(log_path, 'wb')
        self.argv = argv
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self._log)
        self.out = _LineReader(self.proc.stdout, self.name)
        self.returncode = None

    def stop(self, timeout=15.0):
        """SIGTERM, then SIGKILL after timeout. Returns the exit code (idempotent)."""
        if self.returncode is not None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f'[e2e] {self.name} pid={self.proc.pid} did not exit {timeout}s after SIGTERM; killing')
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.returncode = self.proc.returncode
        self._log.close()
        return self.returncode

    def log_text(self):
        try:
            with open(self.log_path, 'rb') as f:
                return f.read().decode('utf-8', 'replace')
        except OSError as e:
            return f'<cannot read {self.log_path}: {e}>'


class Skysnap(_Proc):
    name = 'skysnap'

    def __init__(self, binary, workdir, extra_env=None):
        # skysnap maps every SKYSNAP_* variable onto its config and rejects unknown keys
        # (SKYSNAP_BIN -> "unknown configuration key bin"), so pass none of ours through.
        env = {k: v for k, v in os.environ.items() if not k.startswith('SKYSNAP_')}
        env.setdefault('RUST_LOG', 'info')
        env['SKYSNAP_TASKS_LOG_FLUSH_INTERVAL_MS'] = '50'
        env.update(extra_env or {})
        argv = [binary, 'serve',
                '--grpc-addr', '127.0.0.1:0',
                '--http-addr', '127.0.0.1:0',
                '--metrics-addr', '127.0.0.1:0',
                '--sqlite-path', os.path.join(workdir, 'skysnap.db')]
        super().__init__(argv, env, workdir, os.path.join(workdir, 'skysnap.stderr.log'))
        m = self.out.wait_line(READY_RE.pattern, timeout=30)
        if m is None:
            rc = self.stop(timeout=5)
            pytest.fail(f'skysnap did not print its ready line within 30s (exit code {rc});\n'
                        f'stdout: {self.out.all}\nstderr:\n{self.log_text()}')
        self.grpc_addr, self.http_addr, self.metrics_addr = m.group(1), m.group(2), m.group(3)
        self.base = f'http://{self.http_addr}'

    def api(self, method, path, body=None, expect=(200,)):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={'Content-Type': 'application/json',
                                              'Accept': 'application/json'})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        text = raw.decode('utf-8', 'replace')
        assert status in expect, f'{method} {path} body={body!r} -> HTTP {status}: {text}'
        return json.loads(text) if text.strip() else None

    def create_task(self, **fields):
        return self.api('POST', '/api/v1/tasks', fields, expect=(201,))

    def task_logs(self, task_id):
        return self.api('GET', f'/api/v1/tasks/{task_id}/logs')

    def logs_for(self, task_id, instance, operation):
        return [row for row in self.task_logs(task_id)
                if row['instance'] == instance and row['operation'] == operation]

    def segments(self, task_id):
        return self.api('GET', f'/api/v1/tasks/{task_id}/segments')

    def snapshots(self, segment_id):
        return self.api('GET', f'/api/v1/segments/{urllib.request.quote(segment_id, safe="")}/snapshots')

    def services(self):
        return self.api('GET', '/api/v1/services')


class App(_Proc):
    name = 'app'

    def __init__(self, workdir, grpc_addr, service, instance, token=None, extra_env=None):
        env = dict(os.environ)
        for k in list(env):
            if k.startswith('SW_'):
                del env[k]
        env.update({
            'APP_PORT': '0',
            'SW_AGENT_COLLECTOR_BACKEND_SERVICES': grpc_addr,
            'SW_AGENT_NAME': service,
            'SW_AGENT_INSTANCE_NAME': instance,
            'SW_AGENT_COLLECTOR_GET_PROFILE_TASK_INTERVAL': '1',
            'SW_AGENT_AUTHENTICATION': token or '',
            'PYTHONUNBUFFERED': '1',
        })
        env.update(extra_env or {})
        self.name = f'app[{instance}]'
        self.instance = instance
        super().__init__([sys.executable, APP_PY], env, workdir,
                         os.path.join(workdir, f'app-{instance}.stderr.log'))
        m = self.out.wait_line(r'^READY (\d+)$', timeout=60)
        if m is None:
            rc = self.stop(timeout=5)
            pytest.fail(f'{self.name} did not print READY within 60s (exit code {rc});\n'
                        f'stderr:\n{self.log_text()}')
        self.port = int(m.group(1))
        self.ready_at = time.monotonic()

    def get(self, path, timeout=30):
        with urllib.request.urlopen(f'http://127.0.0.1:{self.port}{path}', timeout=timeout) as resp:
            return resp.status, resp.read()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, 'rep_' + rep.when, rep)


class _Env:
    """Starts processes for one test; everything is stopped at teardown (apps first)."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.binary = os.environ.get('SKYSNAP_BIN', DEFAULT_BIN)
        self.skysnaps = []
        self.apps = []

    def skysnap(self, extra_env=None):
        if not (os.path.isfile(self.binary) and os.access(self.binary, os.X_OK)):
            pytest.fail(f'skysnap binary not found or not executable: {self.binary!r} '
                        f'(set SKYSNAP_BIN or run `cargo build` first)')
        s = Skysnap(self.binary, self.workdir, extra_env)
        self.skysnaps.append(s)
        return s

    def app(self, skysnap, service, instance, token=None, extra_env=None):
        a = App(self.workdir, skysnap.grpc_addr, service, instance, token, extra_env)
        self.apps.append(a)
        return a


@pytest.fixture
def e2e(request):
    with tempfile.TemporaryDirectory(prefix='skysnap-e2e-') as workdir:
        env = _Env(workdir)
        try:
            yield env
        finally:
            for a in env.apps:
                a.stop(timeout=10)
            rcs = [(s, s.stop(timeout=20)) for s in env.skysnaps]
            failed = getattr(request.node, 'rep_call', None) is None or request.node.rep_call.failed
            bad_rc = [rc for _, rc in rcs if rc != 0]
            for s, rc in rcs:
                noisy = [ln for ln in s.log_text().splitlines() if ' WARN ' in ln or ' ERROR ' in ln]
                print(f'\n[e2e] skysnap exit code {rc}; {len(noisy)} WARN/ERROR lines in its stderr'
                      + ''.join(f'\n    {ln}' for ln in noisy[:10]))
            if failed or bad_rc:
                for p in env.apps + env.skysnaps:
                    text = p.log_text()
                    tail = '\n'.join(text.splitlines()[-200:])
                    print(f'\n===== {p.name} (exit {p.returncode}) stderr, last 200 lines =====\n{tail}')
            for s, rc in rcs:
                assert rc == 0, f'skysnap exited with {rc} after SIGTERM (expected 0)'
