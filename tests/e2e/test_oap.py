"""End-to-end in front of a real Apache SkyWalking OAP 10.1.0 (scripts/services/oap.sh):
the real Python agent reports to skysnap, which keeps profiling and forwards everything
else to the OAP.

Needs two OAPs started by the test command (scripts/test.sh):
    SKYSNAP_TEST_OAP_GRPC / SKYSNAP_TEST_OAP_HTTP    first OAP (127.0.0.1:21800 / :22800)
    SKYSNAP_TEST_OAP2_GRPC / SKYSNAP_TEST_OAP2_HTTP  second OAP (127.0.0.1:21801 / :22801)
Skipped when they are unset. The tests stop and start the OAPs themselves (oap.sh with the
same OAP_DIR and ports), and leave them running.
"""

import os
import subprocess
import sys
import time
import urllib.parse

import pytest

from conftest import REPO, unique, wait_for

sys.path.insert(0, os.path.join(REPO, 'tests', 'oap'))
import oap_graphql as oap  # noqa: E402

OAP_SCRIPT = os.path.join(REPO, 'scripts', 'services', 'oap.sh')
SERVICES_DIR = os.environ.get('SKYSNAP_SERVICES_DIR', '/tmp/skysnap-services')


def _oap_env(n):
    """(grpc host:port, http base url, oap.sh environment) of OAP number n (1 or 2)."""
    suffix = '' if n == 1 else str(n)
    grpc = os.environ.get(f'SKYSNAP_TEST_OAP{suffix}_GRPC')
    http = os.environ.get(f'SKYSNAP_TEST_OAP{suffix}_HTTP')
    if not grpc or not http:
        pytest.skip(f'SKYSNAP_TEST_OAP{suffix}_GRPC/_HTTP not set (scripts/test.sh starts the OAPs)')
    env = {k: v for k, v in os.environ.items() if not k.startswith('SKYSNAP_TEST_')}
    env.update({
        'OAP_DIR': os.path.join(SERVICES_DIR, 'oap' if n == 1 else f'oap{n}'),
        'OAP_GRPC_PORT': grpc.rsplit(':', 1)[1],
        'OAP_HTTP_PORT': http.rsplit(':', 1)[1],
    })
    return grpc, f'http://{http}', env


def _oap(action, n):
    _, _, env = _oap_env(n)
    subprocess.run([OAP_SCRIPT, action], env=env, check=True, timeout=240)


def _metric(skysnap, name, *labels):
    """Sum of the samples of NAME whose label text contains every one of LABELS."""
    import urllib.request
    with urllib.request.urlopen(f'http://{skysnap.metrics_addr}/metrics', timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(' ')
        rest = head[len(name):]
        if rest and rest[0] not in '{ ':
            continue
        if all(label in rest for label in labels):
            total += float(value)
    return total


def _keep_alive_through(skysnap, service, instance, timeout):
    """One ManagementService/keepAlive through skysnap with the agent's own stubs; returns
    (grpc status code name or 'OK', seconds taken)."""
    import grpc
    from skywalking.protocol.management.Management_pb2 import InstancePingPkg
    from skywalking.protocol.management.Management_pb2_grpc import ManagementServiceStub
    with grpc.insecure_channel(skysnap.grpc_addr) as channel:
        stub = ManagementServiceStub(channel)
        started = time.monotonic()
        try:
            stub.keepAlive(InstancePingPkg(service=service, serviceInstance=instance), timeout=timeout)
            code = 'OK'
        except grpc.RpcError as error:
            code = error.code().name
        return code, time.monotonic() - started


def _upstream_env(*addresses):
    return {
        'SKYSNAP_UPSTREAM_ADDRESSES': ','.join(addresses),
        'SKYSNAP_UPSTREAM_TIMEOUT_MS': '3000',
        'SKYSNAP_UPSTREAM_CONNECT_TIMEOUT_MS': '1000',
        'SKYSNAP_UPSTREAM_RETRY_BACKOFF_MS': '500',
    }


def _profile(skysnap, app, service, endpoint='/slow', requests=3):
    """Creates a task, waits until the agent has it, sends slow requests; returns the task."""
    task = skysnap.create_task(service=service, endpoint_name=endpoint, duration=3,
                               min_duration_threshold=100, dump_period=20, max_sampling_count=5)
    wait_for(lambda: skysnap.logs_for(task['id'], app.instance, 'NOTIFIED'), 30, 'task NOTIFIED')
    time.sleep(1.5)  # the agent starts the task on its next poll cycle
    for _ in range(requests):
        app.get(endpoint)
    return task


def _kept_segment(skysnap, task_id, timeout=30):
    """A profiled segment of the task whose trace segment skysnap kept (trace fields set)."""
    return wait_for(lambda: [s for s in skysnap.segments(task_id) if s.get('trace_id')], timeout,
                    'a profiled segment with its trace segment kept')[0]


def test_forwarding_to_real_oap_profiling_stays_and_survives_oap_restart(e2e):
    oap_grpc, oap_http, _ = _oap_env(1)
    skysnap = e2e.skysnap(_upstream_env(oap_grpc))
    service, instance = unique('oapfwd'), 'oapfwd-1'
    app = e2e.app(skysnap, service, instance, extra_env={'APP_REPORT_ALL': '1'})

    # --- everything that is not profiling reaches the OAP unchanged ---------------------
    task = _profile(skysnap, app, service)
    app.get('/ping')
    oap.wait_for(lambda: oap.find_service(oap_http, service), 90, f'OAP lists service {service}')
    instances = oap.wait_for(lambda: oap.list_instances(oap_http, service), 60, 'OAP lists the instance')
    assert instance in [i['name'] for i in instances]
    assert [i for i in instances if i['name'] == instance][0]['language'] == 'PYTHON'
    traces = oap.wait_for(lambda: oap.basic_traces(oap_http, service, endpoint='/slow'), 90,
                          'OAP has traces of /slow')
    assert all('/slow' in t['endpointNames'] for t in traces)
    logs = oap.wait_for(lambda: [lg for lg in oap.logs(oap_http, service)
                                 if 'skysnap-e2e handled /slow' in (lg['content'] or '')],
                        90, 'OAP has the app\'s log records')
    assert logs[0]['serviceInstanceName'] == instance
    meters = oap.wait_for(lambda: oap.metric_values(oap_http, 'meter_instance_pvm_thread_active_count',
                                                    service, instance=instance), 90,
                          'OAP has the agent\'s meters')
    assert all(value > 0 for value in meters)
    # skysnap recorded the instance too.
    assert any(s['service'] == service and instance in [i['name'] for i in s['instances']]
               for s in skysnap.services())

    # --- profiling stays in skysnap, with the kept trace segment's spans ----------------
    summary = _kept_segment(skysnap, task['id'])
    assert summary['endpoint'] == '/slow'
    assert summary['snapshot_count'] > 0
    assert summary['duration'] >= 900, summary  # SLOW_SECONDS=1
    segment_id = summary['segment_id']
    detail = skysnap.api('GET', f'/api/v1/segments/{urllib.parse.quote(segment_id, safe="")}')
    assert detail['segment']['trace_id'] == summary['trace_id']
    assert detail['segment']['endpoint'] == '/slow'
    root = detail['spans'][0]
    assert root['operation_name'] == '/slow' and root['span_type'] == 'Entry'
    assert root['parent_span_id'] == -1
    # The durations the agent reported, as the OAP stored them for the same trace.
    oap_spans = oap.wait_for(lambda: [s for s in oap.trace(oap_http, summary['trace_id'])
                                      if s['segmentId'] == segment_id], 60,
                             'the OAP has the same trace segment')
    oap_root = [s for s in oap_spans if s['spanId'] == 0][0]
    assert (root['start_time'], root['end_time']) == (oap_root['startTime'], oap_root['endTime'])
    assert root['duration'] == oap_root['endTime'] - oap_root['startTime']
    # The flame graph by agent instance goes through the kept trace segments.
    by_instance = skysnap.api('GET', f'/api/v1/tasks/{task["id"]}/flamegraph?instance={instance}')
    assert by_instance['value'] >= summary['snapshot_count'] > 0, by_instance['value']
    nobody = skysnap.api('GET', f'/api/v1/tasks/{task["id"]}/flamegraph?instance=nobody')
    assert nobody['value'] == 0
    for name in ('skywalking.v3.TraceSegmentReportService', 'skywalking.v3.LogReportService',
                 'skywalking.v3.MeterReportService', 'skywalking.v3.ManagementService'):
        assert _metric(skysnap, 'skysnap_upstream_calls_total', f'service="{name}"', 'code="ok"') > 0, name

    # --- OAP stopped: profiling goes on, forwarded calls fail fast and are counted -----
    _oap('stop', 1)
    try:
        unavailable_before = _metric(skysnap, 'skysnap_upstream_calls_total', 'code="unavailable"')
        code, seconds = _keep_alive_through(skysnap, service, instance, timeout=30)
        assert code == 'UNAVAILABLE', code
        assert seconds < 3.5, f'a forwarded call took {seconds:.1f} s to fail'
        segments_before = {s['segment_id'] for s in skysnap.segments(task['id'])}
        for _ in range(2):
            app.get('/slow')
        wait_for(lambda: {s['segment_id'] for s in skysnap.segments(task['id'])} - segments_before,
                 30, 'new profiled segments while the OAP is down')
        wait_for(lambda: _metric(skysnap, 'skysnap_upstream_calls_total', 'code="unavailable"')
                 > unavailable_before + 1, 30, 'the agent\'s failed forwarded calls counted')
        assert app.proc.poll() is None, 'the agent\'s app died'
        assert app.get('/ping')[0] == 200
    finally:
        _oap('start', 1)

    # --- OAP back (empty: H2 in memory): forwarding resumes without a restart -----------
    oap.wait_for(lambda: oap.find_service(oap_http, service), 120,
                 'the restarted OAP lists the service again')
    app.get('/ping')
    oap.wait_for(lambda: oap.basic_traces(oap_http, service), 90, 'traces reach the restarted OAP')
    assert skysnap.proc.poll() is None


def test_two_upstreams_spread_and_fail_over(e2e):
    oap1_grpc, oap1_http, _ = _oap_env(1)
    oap2_grpc, oap2_http, _ = _oap_env(2)
    skysnap = e2e.skysnap(_upstream_env(oap1_grpc, oap2_grpc))
    service, instance = unique('oaprr'), 'oaprr-1'
    app = e2e.app(skysnap, service, instance, extra_env={'APP_REPORT_ALL': '1'})
    for _ in range(6):
        app.get('/ping')
    # Calls alternate between the two: both OAPs get the agent's heartbeats.
    for base in (oap1_http, oap2_http):
        oap.wait_for(lambda: oap.find_service(base, service), 90, f'{base} lists {service}')
    # The Python agent keeps one segment stream open for as long as it can, so its
    # traces go to whichever OAP that stream was forwarded to.
    oaps = {1: (oap1_grpc, oap1_http), 2: (oap2_grpc, oap2_http)}

    def with_traces():
        return [n for n, (_, base) in oaps.items() if oap.basic_traces(base, service)]
    holder = oap.wait_for(with_traces, 90, 'traces reach one of the OAPs')[0]
    other = 2 if holder == 1 else 1
    holder_grpc = oaps[holder][0]
    other_http = oaps[other][1]

    # The OAP holding the stream stops: the agent's stream breaks, and its next one, like
    # every other call, goes to the remaining OAP.
    _oap('stop', holder)
    try:
        def marked_down():
            _keep_alive_through(skysnap, service, instance, 5)
            return _metric(skysnap, 'skysnap_upstream_up', f'upstream="{holder_grpc}"') == 0
        wait_for(marked_down, 30, 'the stopped OAP marked down')
        codes = [_keep_alive_through(skysnap, service, instance, 5)[0] for _ in range(10)]
        assert codes == ['OK'] * 10, codes

        def traces_on_other():
            app.get('/ping')
            return oap.basic_traces(other_http, service)
        oap.wait_for(traces_on_other, 90, 'traces move to the remaining OAP')
    finally:
        _oap('start', holder)
    wait_for(lambda: _metric(skysnap, 'skysnap_upstream_up', f'upstream="{holder_grpc}"') == 1, 30,
             'the restarted OAP taken back')
