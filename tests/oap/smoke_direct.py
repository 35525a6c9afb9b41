"""Smoke test: the real SkyWalking Python agent (apache-skywalking==1.2.0) reports straight to a
real OAP 10.1.0 (scripts/services/oap.sh), and the OAP's GraphQL API shows the agent's
service, its instance, traces of its endpoint, its logs and its meters.

    scripts/services/oap.sh install && scripts/services/oap.sh start
    SKYSNAP_TEST_OAP_GRPC=127.0.0.1:21800 SKYSNAP_TEST_OAP_HTTP=127.0.0.1:22800 \\
        .venv/bin/python -m pytest tests/oap/smoke_direct.py -v -s

Skipped when SKYSNAP_TEST_OAP_GRPC is unset. SKYSNAP_TEST_OAP_HTTP (host:port of the OAP's
REST/GraphQL port) defaults to 127.0.0.1:22800. Run it with a python that has the agent.

The instrumented app is this file itself, run as `python smoke_direct.py --app` (the e2e app,
tests/e2e/app.py, switches the agent's log and meter reporters off in code). The agent
settings that make it report logs and meters, with short periods, are in AGENT_ENV.
"""

import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))

# What the agent needs to report everything to the OAP quickly (all read from the
# environment when `skywalking` is imported).
AGENT_ENV = {
    'SW_AGENT_PROTOCOL': 'grpc',
    'SW_AGENT_COLLECTOR_HEARTBEAT_PERIOD': '5',          # keepAlive every 5 s (default 30)
    'SW_AGENT_COLLECTOR_PROPERTIES_REPORT_PERIOD_FACTOR': '2',
    'SW_AGENT_LOG_REPORTER_ACTIVE': 'True',               # python `logging` records -> OAP
    'SW_AGENT_LOG_REPORTER_LEVEL': 'WARNING',             # records at WARNING and above
    'SW_AGENT_METER_REPORTER_ACTIVE': 'True',             # MeterReportService
    'SW_AGENT_PVM_METER_REPORTER_ACTIVE': 'True',         # instance_pvm_* gauges
    'SW_AGENT_METER_REPORTER_PERIOD': '5',                # seconds (default 20)
    'SW_AGENT_PROFILE_ACTIVE': 'False',                   # no ProfileTask polling needed here
    'SW_AGENT_LOGGING_LEVEL': 'WARNING',                  # the agent's own log
    'SW_AGENT_DISABLE_PLUGINS': 'sw_(?!http_server$)',    # only http.server is instrumented
}

APP_LOGGER = 'skysnap-oap-smoke'
LOG_MARK = 'skysnap-smoke handled'


def run_app():
    """The instrumented app: GET /hello and /ping on 127.0.0.1:$APP_PORT; each /hello also
    writes a WARNING log record (reported by the agent). Prints `READY <port>`."""
    import logging

    from skywalking import agent, config

    config.init(agent_collector_backend_services=os.environ['SW_AGENT_COLLECTOR_BACKEND_SERVICES'],
                agent_name=os.environ['SW_AGENT_NAME'],
                agent_instance_name=os.environ['SW_AGENT_INSTANCE_NAME'])
    agent.start()

    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    log = logging.getLogger(APP_LOGGER)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            path = self.path.split('?', 1)[0]
            if path not in ('/hello', '/ping'):
                self.send_error(404)
                return
            if path == '/hello':
                time.sleep(0.02)
                log.warning('%s %s', LOG_MARK, path)
            body = b'ok\n'
            self.send_response(200)
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):
            pass

    server = ThreadingHTTPServer(('127.0.0.1', int(os.environ.get('APP_PORT', '0'))), Handler)
    server.daemon_threads = True
    print(f'READY {server.server_address[1]}', flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == '__main__' and sys.argv[1:] == ['--app']:
    run_app()
    sys.exit(0)

# ---- the test ------------------------------------------------------------------------

import pytest  # noqa: E402

sys.path.insert(0, HERE)
import oap_graphql as oap  # noqa: E402

OAP_GRPC = os.environ.get('SKYSNAP_TEST_OAP_GRPC')
OAP_BASE = 'http://' + os.environ.get('SKYSNAP_TEST_OAP_HTTP', '127.0.0.1:22800')

pytestmark = pytest.mark.skipif(not OAP_GRPC, reason='SKYSNAP_TEST_OAP_GRPC is not set '
                                '(scripts/services/oap.sh start; then SKYSNAP_TEST_OAP_GRPC=127.0.0.1:21800)')


def start_app(grpc_addr, service, instance, log_path):
    """Starts the instrumented app reporting to grpc_addr; returns (Popen, port)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('SW_')}
    env.update(AGENT_ENV)
    env.update({'SW_AGENT_COLLECTOR_BACKEND_SERVICES': grpc_addr, 'SW_AGENT_NAME': service,
                'SW_AGENT_INSTANCE_NAME': instance, 'APP_PORT': '0', 'PYTHONUNBUFFERED': '1'})
    errf = open(log_path, 'wb')
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--app'], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf)
    errf.close()
    line = [None]
    t = threading.Thread(target=lambda: line.__setitem__(0, proc.stdout.readline()), daemon=True)
    t.start()
    t.join(60)
    raw = (line[0] or b'').decode().strip()
    if not raw.startswith('READY '):
        proc.kill()
        proc.wait(10)
        with open(log_path, 'rb') as f:
            pytest.fail(f'app did not start: {raw!r}\n{f.read().decode("utf-8", "replace")[-4000:]}')
    return proc, int(raw.split()[1])


def stop_app(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_agent_data_reaches_oap(tmp_path):
    pytest.importorskip('skywalking', reason='needs apache-skywalking==1.2.0 (e.g. .venv/bin/python)')
    oap.wait_for(lambda: oap.query(OAP_BASE, '{ getTimeInfo { timezone } }'), 30, 'OAP GraphQL')
    suffix = uuid.uuid4().hex[:8]
    service, instance = f'smoke-{suffix}', f'smoke-inst-{suffix}'
    t0 = time.monotonic()
    proc, port = start_app(OAP_GRPC, service, instance, str(tmp_path / 'app.stderr.log'))
    stop = threading.Event()

    def traffic():  # a few requests a second until the test ends
        while not stop.is_set():
            for path in ('/hello', '/ping'):
                try:
                    urllib.request.urlopen(f'http://127.0.0.1:{port}{path}', timeout=10).read()
                except OSError:
                    pass
            stop.wait(0.5)

    th = threading.Thread(target=traffic, daemon=True)
    th.start()

    def seen(what):
        print(f'[smoke] {what} after {time.monotonic() - t0:.1f}s')

    try:
        svc = oap.wait_for(lambda: oap.find_service(OAP_BASE, service), 90, f'service {service} listed')
        seen(f'service {svc}')
        assert svc['id'] == oap.service_id(service) and 'GENERAL' in svc['layers']

        insts = oap.wait_for(lambda: oap.list_instances(OAP_BASE, service), 60, 'instance listed')
        seen(f'instances {[i["name"] for i in insts]}')
        assert [i['name'] for i in insts] == [instance]
        assert insts[0]['language'] == 'PYTHON', insts

        traces = oap.wait_for(lambda: oap.basic_traces(OAP_BASE, service, endpoint='/hello'), 90,
                              'traces of /hello')
        seen(f'{len(traces)} traces of /hello, e.g. {traces[0]}')
        assert all(t['endpointNames'] == ['/hello'] for t in traces), traces
        spans = oap.trace(OAP_BASE, traces[0]['traceIds'][0])
        assert any(s['endpointName'] == '/hello' and s['type'] == 'Entry' for s in spans), spans

        lgs = oap.wait_for(lambda: [lg for lg in oap.logs(OAP_BASE, service) if LOG_MARK in (lg['content'] or '')],
                           90, 'logs')
        seen(f'{len(lgs)} logs, e.g. {lgs[0]}')
        assert lgs[0]['serviceInstanceName'] == instance
        assert lgs[0]['endpointName'] == '/hello' and lgs[0]['traceId'], lgs[0]

        # Meters: the agent's PVM gauges, turned into meter_instance_pvm_* by the OAP's
        # meter-analyzer-config/python-runtime.yaml, are read back with MQE.
        vals = oap.wait_for(lambda: oap.metric_values(OAP_BASE, 'meter_instance_pvm_thread_active_count',
                                                      service, instance=instance), 120,
                            'meter meter_instance_pvm_thread_active_count')
        seen(f'meter_instance_pvm_thread_active_count values {vals}')
        assert max(vals) >= 1
        # Each meter reaches storage on its own persist cycle: wait for this one too.
        cpu = oap.wait_for(lambda: oap.metric_values(OAP_BASE, 'meter_instance_pvm_total_cpu_utilization',
                                                     service, instance=instance), 60, 'CPU meter values')
        seen(f'meter_instance_pvm_total_cpu_utilization values {cpu}')
        assert cpu

        # An OAL metric computed from the traces, for good measure.
        cpm = oap.wait_for(lambda: oap.metric_values(OAP_BASE, 'endpoint_cpm', service, endpoint='/hello'), 60,
                           'endpoint_cpm of /hello')
        seen(f'endpoint_cpm of /hello {cpm}')
        assert max(cpm) > 0
    finally:
        stop.set()
        th.join(15)
        stop_app(proc)
