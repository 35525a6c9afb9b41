"""End-to-end: skysnap <-> the real SkyWalking Python agent (apache-skywalking==1.2.0).

See conftest.py for the process helpers and app.py for the instrumented app.
"""

import os
import threading
import time
import urllib.parse
import urllib.request
import uuid

import pytest

from conftest import now_ms, unique, wait_for

SLOW_FUNC = 'skysnap_sleepy_handler'


def _task_body(service, **over):
    body = {
        'service': service,
        'endpoint_name': '/slow',
        'duration': 1,
        'min_duration_threshold': 100,
        'dump_period': 20,
        'max_sampling_count': 5,
    }
    body.update(over)
    return body


def _instances_of(services, service):
    for s in services:
        if s['service'] == service:
            return [i['name'] for i in s['instances']]
    return []


def _store_env(store, request):
    """skysnap's environment for the store: SQLite (default) or a fresh database on the
    test ClickHouse, dropped when the test ends."""
    if store == 'sqlite':
        return {}
    url = os.environ.get('SKYSNAP_TEST_CLICKHOUSE_URL')
    if not url:
        pytest.skip('SKYSNAP_TEST_CLICKHOUSE_URL is not set (scripts/test.sh starts ClickHouse and sets it)')
    database = f'e2e_{uuid.uuid4().hex[:12]}'

    def drop():
        with urllib.request.urlopen(url, data=f'DROP DATABASE IF EXISTS {database}'.encode(), timeout=30):
            pass

    request.addfinalizer(drop)
    return {'SKYSNAP_STORE_KIND': 'clickhouse', 'SKYSNAP_CLICKHOUSE_URL': url,
            'SKYSNAP_CLICKHOUSE_DATABASE': database}


def _flame_nodes(root):
    """Every node of a flame-graph tree, without recursion."""
    pending = [root]
    while pending:
        node = pending.pop()
        yield node
        pending.extend(node['children'])


@pytest.mark.parametrize('store', ['sqlite', 'clickhouse'])
def test_agent_profiles_slow_endpoint(e2e, store, request):
    t0 = time.monotonic()
    sk = e2e.skysnap(_store_env(store, request))
    service, instance = unique('e2e'), unique('inst')

    before = now_ms()
    task = sk.create_task(**_task_body(service))
    tid = task['id']
    assert task['service'] == service and task['endpoint_name'] == '/slow'
    assert task['duration'] == 1 and task['dump_period'] == 20 and task['max_sampling_count'] == 5
    assert before - 5000 <= task['start_time'] <= now_ms() + 5000, task
    print(f'\n[e2e] task {tid} start_time={task["start_time"]} service={service}')

    app = e2e.app(sk, service, instance)
    print(f'[e2e] app READY on port {app.port} after {time.monotonic() - t0:.1f}s')

    # 4. The agent polls getProfileTaskCommands every second -> NOTIFIED for its instance.
    notified = wait_for(lambda: sk.logs_for(tid, instance, 'NOTIFIED'), 30, 'NOTIFIED log')
    notified_at = time.monotonic()
    print(f'[e2e] NOTIFIED {notified_at - app.ready_at:.1f}s after app READY: {notified}')

    wait_for(lambda: instance in _instances_of(sk.services(), service), 15,
             f'/api/v1/services to list {service}/{instance}')
    svc = [s for s in sk.services() if s['service'] == service][0]
    print(f'[e2e] services entry: {svc}')

    # 5. Drive slow requests: 3 in parallel (each ~1s inside skysnap_sleepy_handler).
    errors = []

    def hit():
        try:
            status, body = app.get('/slow')
            assert status == 200 and body == b'slow done\n', (status, body)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    req_start = time.monotonic()
    threads = [threading.Thread(target=hit) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    print(f'[e2e] 3 parallel /slow requests took {time.monotonic() - req_start:.1f}s')

    def full_segments():
        segs = sk.segments(tid)
        return [s for s in segs if s['snapshot_count'] >= 5] and segs

    segs = wait_for(full_segments, 20, 'a segment with >= 5 snapshots')
    # Give the other segments a moment to finish flushing, for the printout only.
    time.sleep(1.0)
    segs = sk.segments(tid)
    print(f'[e2e] segments ({len(segs)}): '
          + ', '.join(f'{s["segment_id"]}={s["snapshot_count"]}' for s in segs))
    seg = max(segs, key=lambda s: s['snapshot_count'])
    assert seg['first_dump_time'] <= seg['last_dump_time'], seg

    snaps = sk.snapshots(seg['segment_id'])
    assert len(snaps) == seg['snapshot_count'], (len(snaps), seg)
    assert all(s['task_id'] == tid for s in snaps), [s['task_id'] for s in snaps]
    assert all(s['segment_id'] == seg['segment_id'] for s in snaps)
    seqs = [s['sequence'] for s in snaps]
    assert all(a < b for a, b in zip(seqs, seqs[1:])), f'sequences not strictly increasing: {seqs}'
    times = [s['dump_time'] for s in snaps]
    assert all(a <= b for a, b in zip(times, times[1:])), f'dump_time not ascending: {times}'
    assert times[0] == seg['first_dump_time'] and times[-1] == seg['last_dump_time'], (times, seg)
    with_func = [s for s in snaps if any(SLOW_FUNC in f for f in s['stack'])]
    print(f'[e2e] segment {seg["segment_id"]}: {len(snaps)} snapshots, {len(with_func)} contain '
          f'{SLOW_FUNC}; seq {seqs[0]}..{seqs[-1]}; span {times[-1] - times[0]} ms; '
          f'sample stack: {snaps[len(snaps) // 2]["stack"][:6]}')
    assert len(with_func) >= 5, [s['stack'] for s in snaps[:3]]

    # SkyWalking's stack tree of the segment and the task's flame graph hold the hot
    # function, with snapshots and time.
    seg_q = urllib.parse.quote(seg['segment_id'], safe='')
    analysis = sk.api('GET', f'/api/v1/analysis?segment={seg_q}')
    assert analysis['tip'] is None, analysis['tip']
    hot = [e for tree in analysis['trees'] for e in tree['elements'] if SLOW_FUNC in e['code_signature']]
    assert hot and hot[0]['count'] >= 5 and hot[0]['duration'] > 0, hot
    print(f'[e2e] analysis: {len(analysis["trees"])} tree(s); {hot[0]["code_signature"]!r} '
          f'count={hot[0]["count"]} duration={hot[0]["duration"]} ms '
          f'self={hot[0]["duration_child_excluded"]} ms')
    flame = sk.api('GET', f'/api/v1/tasks/{tid}/flamegraph')
    assert flame['value'] >= len(snaps), (flame['value'], len(snaps))
    hot_nodes = [n for n in _flame_nodes(flame) if SLOW_FUNC in n['name']]
    assert hot_nodes and sum(n['value'] for n in hot_nodes) >= len(with_func), hot_nodes[:1]
    assert all(n['wall_ms'] == n['value'] * 20 for n in hot_nodes), hot_nodes[:1]
    print(f'[e2e] flame graph: {flame["value"]} snapshots, {sum(n["value"] for n in hot_nodes)} in '
          f'{SLOW_FUNC}, {sum(n["wall_ms"] for n in hot_nodes)} ms sampled')

    # 6. The agent reports reportTaskFinish Duration*60s after the task started.
    deadline_s = (task['start_time'] + 90_000 - now_ms()) / 1000
    print(f'[e2e] waiting up to {deadline_s:.0f}s for EXECUTION_FINISHED ...')
    finished = wait_for(lambda: sk.logs_for(tid, instance, 'EXECUTION_FINISHED'),
                        max(deadline_s, 1), 'EXECUTION_FINISHED log', interval=0.5)
    print(f'[e2e] EXECUTION_FINISHED {time.monotonic() - notified_at:.1f}s after NOTIFIED was seen, '
          f'{(finished[0]["operation_time"] - task["start_time"]) / 1000:.1f}s after task start_time')
    time.sleep(0.5)  # would a duplicate show up?
    logs = [row for row in sk.task_logs(tid) if row['instance'] == instance]
    ops = sorted(row['operation'] for row in logs)
    assert ops == ['EXECUTION_FINISHED', 'NOTIFIED'], logs
    assert all(row['task_id'] == tid and row['service'] == service for row in logs), logs
    print(f'[e2e] task logs: {logs}')
    print(f'[e2e] test body wall time {time.monotonic() - t0:.1f}s')


def test_agent_token_required(e2e):
    t0 = time.monotonic()
    sk = e2e.skysnap({'SKYSNAP_AUTH_AGENT_TOKEN': 'e2e-secret'})
    service = unique('e2e-auth')
    good_inst, bad_inst = unique('good'), unique('bad')
    task = sk.create_task(**_task_body(service))
    tid = task['id']

    good = e2e.app(sk, service, good_inst, token='e2e-secret')
    bad = e2e.app(sk, service, bad_inst, token='wrong')

    wait_for(lambda: sk.logs_for(tid, good_inst, 'NOTIFIED'), 30, 'NOTIFIED for the right token')
    print(f'\n[e2e] right token: NOTIFIED {time.monotonic() - good.ready_at:.1f}s after READY')

    # The wrong-token agent must get UNAUTHENTICATED: no NOTIFIED within ~8s of its start.
    remaining = 8.0 - (time.monotonic() - bad.ready_at)
    if remaining > 0:
        time.sleep(remaining)
    assert bad.proc.poll() is None, f'wrong-token app died: {bad.log_text()}'
    bad_rows = [row for row in sk.task_logs(tid) if row['instance'] == bad_inst]
    assert bad_rows == [], f'wrong token was accepted: {bad_rows}'
    instances = _instances_of(sk.services(), service)
    assert good_inst in instances, instances
    assert bad_inst not in instances, f'wrong-token instance registered: {instances}'
    unauth_lines = [ln for ln in bad.log_text().splitlines() if 'UNAUTHENTICATED' in ln.upper()]
    print(f'[e2e] wrong token: no NOTIFIED after {time.monotonic() - bad.ready_at:.1f}s; '
          f'{len(unauth_lines)} UNAUTHENTICATED lines in its stderr; instances={instances}')
    print(f'[e2e] test body wall time {time.monotonic() - t0:.1f}s')
