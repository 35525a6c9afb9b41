"""Browser test of skysnap's profiling page against its DOM contract.

The real `skysnap serve`, the real SkyWalking Python agent (tests/e2e/app.py) and the
system Chromium. Two agent apps profile two endpoints with different hot functions:
service 1 `/slow` (time in skysnap_sleepy_handler), service 2 `/busy` (time in
skysnap_busy_handler), so that the diff of the two tasks has frames on both sides.
Screenshots go to target/browser-shots/ and are copied to docs/screenshots/.
"""

import json
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from playwright.sync_api import expect

from conftest import DOC_SHOTS, SHOTS, helpers

wait_for, unique = helpers.wait_for, helpers.unique

SLOW_FUNC = 'skysnap_sleepy_handler'
BUSY_FUNC = 'skysnap_busy_handler'
INVALID_DUMP_PERIOD = 'dump period must be greater than or equals 10 milliseconds'
WAIT_MS = 30_000  # generous: the agent polls every 1 s and flushes snapshots every ~0.5 s

# Classifies every drawn frame of an SVG flame graph by the colour its rect is painted with.
FRAME_COLOURS_JS = """sel => [...document.querySelectorAll(sel + ' g.frame')].map(g => {
    const rect = g.querySelector('rect');
    const fill = rect ? getComputedStyle(rect).fill : '';
    const m = fill.match(/rgba?\\((\\d+),\\s*(\\d+),\\s*(\\d+)/);
    return {name: g.getAttribute('name') || '', fill,
            rgb: m ? [+m[1], +m[2], +m[3]] : null};
})"""


def _flame_nodes(root):
    pending = [root]
    while pending:
        node = pending.pop()
        yield node
        pending.extend(node.get('children') or [])


def _search_sum(root, term):
    """d3-flame-graph's search sum: the values of matching nodes without a matching ancestor."""
    term = term.lower()
    total, pending = 0, [(root, False)]
    while pending:
        node, found_parent = pending.pop()
        found = term in node['name'].lower()
        if found and not found_parent:
            total += node['value']
        pending.extend((c, found_parent or found) for c in node.get('children') or [])
    return total


def _settled_segments(sk, tid, min_snapshots=5, quiet_s=1.5, timeout=30):
    """Waits for a segment with >= min_snapshots, then until the list stops changing."""
    wait_for(lambda: [s for s in sk.segments(tid) if s['snapshot_count'] >= min_snapshots],
             timeout, f'a segment of task {tid} with >= {min_snapshots} snapshots')
    last, since = None, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        segs = sk.segments(tid)
        key = sorted((s['segment_id'], s['snapshot_count']) for s in segs)
        if key != last:
            last, since = key, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return segs
        time.sleep(0.25)
    return sk.segments(tid)


def _drive(app, path, n):
    errors = []

    def hit():
        try:
            status, _ = app.get(path)
            assert status == 200, status
        except Exception as e:  # noqa: BLE001
            errors.append(f'{path}: {e!r}')
    threads = [threading.Thread(target=hit) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, errors


def _preorder_counts(elements):
    """The analysis elements in tree order (parent, then its children in the API's order)."""
    kids = {}
    for e in elements:
        kids.setdefault(e['parent_id'], []).append(e)
    out, pending = [], list(reversed(kids.get(0, [])))
    while pending:
        e = pending.pop()
        out.append(e)
        pending.extend(reversed(kids.get(e['id'], [])))
    return out


def _shot(page, focus_selector, name, doc_name=None):
    os.makedirs(SHOTS, exist_ok=True)
    page.evaluate("s => document.querySelector(s).scrollIntoView({block: 'start'})", focus_selector)
    page.mouse.move(1, 1)  # no tooltip left over from the last click
    page.wait_for_timeout(900)  # let d3's zoom/enter transitions (<= 750 ms) finish before the shot
    path = os.path.join(SHOTS, name)
    page.screenshot(path=path, full_page=False)
    if doc_name is None:
        print(f'[browser] screenshot {path}')
        return
    os.makedirs(DOC_SHOTS, exist_ok=True)
    shutil.copyfile(path, os.path.join(DOC_SHOTS, doc_name))
    print(f'[browser] screenshot {path} (copied to docs/screenshots/{doc_name})')


# Epoch ms -> the value a datetime-local input with step="1" holds, in the browser's own
# time zone (seconds left out when 0: the input normalises "hh:mm:00" to "hh:mm").
TO_LOCAL_JS = """times => times.map(ms => { const d = new Date(ms), p = n => String(n).padStart(2, '0');
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`
        + (d.getSeconds() ? `:${p(d.getSeconds())}` : ''); })"""

DIFF_TOTALS = re.compile(r'^base (\d+) · target (\d+) snapshots$')


def _synthetic_flame(chains=100, depth=50, per_chain=10):
    """A flame graph of 1 + chains*depth nodes (100 x 50 = 5,001): deep rather than wide,
    so that every frame is wide enough to be drawn at 1280 px."""
    children = []
    for c in range(chains):
        node = None
        for d in reversed(range(depth)):
            node = {'name': f'synth-{c}-{d}', 'value': per_chain, 'self': per_chain if node is None else 0,
                    'wall_ms': per_chain * 20, 'children': [node] if node else []}
        children.append(node)
    total = chains * per_chain
    return {'name': 'all', 'value': total, 'self': 0, 'wall_ms': total * 20, 'dump_period_ms': 20,
            'truncated_samples': 0, 'children': children}


def test_profiling_page(env, pages):
    t0 = time.monotonic()
    sk = env.skysnap()
    svc1, svc2 = unique('web-slow'), unique('web-busy')
    inst1, inst2 = unique('inst'), unique('inst')
    page = pages.new('main')

    # 1. Create a task through the form; an invalid one shows the server's reason verbatim.
    page.goto(sk.base + '/')
    form = page.locator('#task-form')
    expect(form).to_be_visible()
    defaults = {n: form.locator(f'[name={n}]').input_value()
                for n in ('duration', 'min_duration_threshold', 'dump_period', 'max_sampling_count')}
    assert defaults == {'duration': '5', 'min_duration_threshold': '200', 'dump_period': '20',
                        'max_sampling_count': '5'}, defaults
    form.locator('[name=service]').fill(svc1)
    form.locator('[name=endpoint_name]').fill('/slow')
    form.locator('[name=duration]').fill('1')
    page.click('#task-create')
    row1 = page.locator('#tasks tr.task', has_text=svc1)
    expect(row1).to_have_count(1, timeout=WAIT_MS)
    tid1 = row1.get_attribute('data-task-id')
    api_task = sk.api('GET', f'/api/v1/tasks/{tid1}')
    assert (api_task['service'], api_task['endpoint_name'], api_task['duration'],
            api_task['dump_period'], api_task['max_sampling_count'],
            api_task['min_duration_threshold']) == (svc1, '/slow', 1, 20, 5, 200), api_task
    expect(row1.locator('.task-state')).to_have_text('running', timeout=WAIT_MS)
    print(f'\n[browser] task {tid1} created through the form ({time.monotonic() - t0:.1f}s)')

    form.locator('[name=dump_period]').fill('5')
    page.click('#task-create')
    expect(page.locator('#task-form-error')).to_have_text(INVALID_DUMP_PERIOD, timeout=WAIT_MS)
    assert len([t for t in sk.api('GET', '/api/v1/tasks') if t['service'] == svc1]) == 1
    form.locator('[name=dump_period]').fill('20')

    # The second task (the diff's target) through the API.
    tid2 = sk.create_task(service=svc2, endpoint_name='/busy', duration=1, min_duration_threshold=100,
                          dump_period=20, max_sampling_count=5)['id']

    # 2. Both agents pick their tasks up; drive /slow and /busy three times each in parallel.
    app1 = env.app(sk, svc1, inst1)
    app2 = env.app(sk, svc2, inst2)
    wait_for(lambda: sk.logs_for(tid1, inst1, 'NOTIFIED'), 30, f'NOTIFIED for {inst1}')
    wait_for(lambda: sk.logs_for(tid2, inst2, 'NOTIFIED'), 30, f'NOTIFIED for {inst2}')
    print(f'[browser] both agents NOTIFIED ({time.monotonic() - t0:.1f}s)')
    th1, err1 = _drive(app1, '/slow', 3)
    th2, err2 = _drive(app2, '/busy', 3)
    for t in th1 + th2:
        t.join(30)
    assert not err1 + err2, err1 + err2
    segs1 = _settled_segments(sk, tid1)
    segs2 = _settled_segments(sk, tid2, min_snapshots=3)
    # A request's trace segment comes when it ends, a little after its snapshots.
    segs1 = wait_for(lambda: (lambda ss: ss if all(s['trace_id'] for s in ss) else None)(sk.segments(tid1)),
                     30, f'the trace segments of every segment of task {tid1}')
    print(f'[browser] segments settled: task 1 {[s["snapshot_count"] for s in segs1]}, '
          f'task 2 {[s["snapshot_count"] for s in segs2]} ({time.monotonic() - t0:.1f}s)')

    # Open the first task (via the second one, so the page fetches it afresh).
    page.locator(f'#tasks tr.task[data-task-id="{tid2}"]').click()
    expect(page.locator('#task-view')).to_be_visible()
    expect(page.locator('#task-title')).to_contain_text(svc2)
    page.locator(f'#tasks tr.task[data-task-id="{tid1}"]').click()
    expect(page.locator('#task-title')).to_contain_text(svc1)

    flame = sk.api('GET', f'/api/v1/tasks/{tid1}/flamegraph')
    total = flame['value']
    hot = page.locator(f'#flame g.frame[name*="{SLOW_FUNC}"]')
    expect(hot.first).to_be_attached(timeout=WAIT_MS)
    expect(page.locator('#flame-total')).to_contain_text(f'{total} snapshots', timeout=WAIT_MS)

    # Search: same share as the API's tree; a regex metacharacter is a plain substring.
    matched = _search_sum(flame, SLOW_FUNC)
    share = f'{100 * matched / total:.1f}'
    page.fill('#flame-search', SLOW_FUNC)
    result = page.locator('#flame-search-result')
    expect(result).to_have_text(re.compile(r'\d+ of \d+ snapshots \([\d.]+%\) match'), timeout=WAIT_MS)
    m = re.search(r'(\d+) of (\d+) snapshots \(([\d.]+)%\) match', result.inner_text())
    assert (int(m.group(1)), int(m.group(2)), m.group(3)) == (matched, total, share), \
        (result.inner_text(), matched, total, share)
    print(f'[browser] search: {result.inner_text()!r} (API: {matched}/{total} = {share}%)')
    page.fill('#flame-search', '(')
    expect(result).to_contain_text(f'0 of {total} snapshots (0.0%) match', timeout=WAIT_MS)
    page.fill('#flame-search', '')

    # Zoom: clicking a frame fades its ancestors; reset removes the fade. The frame must be
    # drawn inside #flame (a chart whose height stays that of an earlier, shallower tree
    # draws the deep frames above its own box, over the sections above it).
    inside = page.evaluate("""sel => { const r = document.querySelector(sel).getBoundingClientRect();
        const b = document.querySelector('#flame').getBoundingClientRect();
        return [r.top >= b.top - 1 && r.bottom <= b.bottom + 1, [r.top, r.bottom], [b.top, b.bottom]]; }""",
                           f'#flame g.frame[name*="{SLOW_FUNC}"] rect')
    assert inside[0], f'{SLOW_FUNC} frame drawn outside #flame: frame y {inside[1]}, #flame y {inside[2]}'
    hot.first.locator('rect').click()
    page.wait_for_selector('#flame g.frame.fade', state='attached')
    faded = page.locator('#flame g.frame.fade').count()
    page.click('#flame-reset')
    page.wait_for_function("!document.querySelector('#flame g.frame.fade')")
    print(f'[browser] zoom: {faded} frames faded, none after reset')

    # Task logs: the instance's NOTIFIED row.
    expect(page.locator('#task-logs tr.log', has_text=inst1).filter(has_text='NOTIFIED').first) \
        .to_be_visible(timeout=WAIT_MS)
    _shot(page, '#task-view', 'task.png', 'task-view.png')

    # Segments: one row per API segment; the stack tree matches SkyWalking's analysis.
    segs1 = sk.segments(tid1)
    expect(page.locator('#segments tr.segment')).to_have_count(len(segs1), timeout=WAIT_MS)
    seg = max(segs1, key=lambda s: s['snapshot_count'])
    page.locator(f'#segments tr.segment[data-segment-id="{seg["segment_id"]}"]').click()
    expect(page.locator('#segment-view')).to_be_visible()
    analysis = sk.api('GET', '/api/v1/analysis?segment=' + urllib.parse.quote(seg['segment_id'], safe=''))
    elements = [e for tree in analysis['trees'] for e in tree['elements']]
    expect(page.locator('#stack-tree tr.stack-node')).to_have_count(len(elements), timeout=WAIT_MS)
    rows = page.eval_on_selector_all('#stack-tree tr.stack-node', """rows => rows.map(r => ({
        id: +r.dataset.id, parent_id: +r.dataset.parentId,
        count: +r.querySelector('.count').textContent.trim().replace(/[^0-9]/g, '')}))""")
    page_counts = [r['count'] for r in rows]
    api_order = [e['count'] for e in elements]
    tree_order = [e['count'] for t in analysis['trees'] for e in _preorder_counts(t['elements'])]
    assert page_counts in (api_order, tree_order), (page_counts, api_order, tree_order)
    if len(analysis['trees']) == 1:
        by_id = {e['id']: e for e in elements}
        assert all(by_id[r['id']]['count'] == r['count'] and by_id[r['id']]['parent_id'] == r['parent_id']
                   for r in rows), (rows, elements)
    print(f'[browser] segment {seg["segment_id"]}: {len(rows)} stack rows, counts {page_counts[:8]}...')
    expect(page.locator('#segment-flame g.frame').first).to_be_attached(timeout=WAIT_MS)
    _shot(page, '#segment-view', 'segment.png', 'segment-view.png')

    # The segment's span tree, one span's range, and back; then a segment not kept.
    _check_span_tree(page, sk, tid1, seg, analysis)
    _check_not_kept_and_synthetic(pages, sk, tid1, seg, analysis)

    # 3. Diff against the /busy task: busy frames hotter (red), sleepy frames cooler (blue).
    page.wait_for_function("""tid => [...document.querySelectorAll('#compare-task option')]
                                  .some(o => o.value === tid || o.textContent.includes(tid))""", arg=tid2)
    value = page.evaluate("""([tid, svc]) => { const o = [...document.querySelectorAll('#compare-task option')]
        .find(o => o.value === tid || o.textContent.includes(tid) || o.textContent.includes(svc));
        return o.value; }""", [tid2, svc2])
    page.select_option('#compare-task', value)
    page.click('#compare-go')
    expect(page.locator('#diff-view')).to_be_visible(timeout=WAIT_MS)
    expect(page.locator(f'#diff-flame g.frame[name*="{BUSY_FUNC}"]').first).to_be_attached(timeout=WAIT_MS)
    page.wait_for_timeout(900)  # rect fills are set at once, widths after the transition
    frames = page.evaluate(FRAME_COLOURS_JS, '#diff-flame')
    red = [f for f in frames if f['rgb'] and f['rgb'][0] - f['rgb'][2] > 30]
    blue = [f for f in frames if f['rgb'] and f['rgb'][2] - f['rgb'][0] > 30]
    assert any(BUSY_FUNC in f['name'] for f in red), [(f['name'][-40:], f['fill']) for f in frames]
    assert any(SLOW_FUNC in f['name'] for f in blue), [(f['name'][-40:], f['fill']) for f in frames]
    expect(page.locator('#diff-legend')).to_be_visible()
    print(f'[browser] diff: {len(frames)} frames, {len(red)} reddish, {len(blue)} bluish')

    # 4. The task against itself over two time ranges: the first and the second half of its
    # dump times. The inputs hold whole seconds and a "to" covers its whole second, so the
    # halves are split at the second holding the middle: base = [first's second, middle's
    # second + 999], target = [the next second, last's second + 999] -- disjoint, together
    # every dump. When first and last dump share that second the split cannot be expressed;
    # then both sides take the whole span and only the looser checks apply.
    options = page.eval_on_selector_all('#compare-task option', 'os => os.map(o => [o.value, o.textContent])')
    assert options[0] == [tid1, 'this task'], options[:3]
    segs1 = sk.segments(tid1)
    first = min(s['first_dump_time'] for s in segs1)
    last = max(s['last_dump_time'] for s in segs1)
    second = lambda ms: ms - ms % 1000  # noqa: E731
    mid = (first + last) // 2
    precise = second(last) > second(mid)
    base_range = (second(first), second(mid) + 999)
    target_range = (second(mid) + 1000, second(last) + 999) if precise else base_range[:1] + (second(last) + 999,)
    if not precise:
        base_range = target_range
    b_from, b_to, t_from, t_to, later = page.evaluate(TO_LOCAL_JS, [
        base_range[0], base_range[1] - 999, target_range[0], target_range[1] - 999, base_range[0] + 60_000])

    # A backwards range (base from a minute after base to): the API's 400 reason in #status,
    # no stale diff left on screen.
    page.select_option('#compare-task', tid1)
    page.fill('#compare-base-start', later)
    page.fill('#compare-base-end', b_from)
    page.fill('#compare-target-start', t_from)
    page.fill('#compare-target-end', t_to)
    page.click('#compare-go')
    expect(page.locator('#status')).to_contain_text('base_end:', timeout=WAIT_MS)
    expect(page.locator('#status')).to_contain_text('is before base_start', timeout=WAIT_MS)
    expect(page.locator('#diff-view')).to_be_hidden()
    print(f'[browser] backwards base range: #status {page.locator("#status").inner_text()!r}')

    page.fill('#compare-base-start', b_from)
    page.fill('#compare-base-end', b_to)
    page.click('#compare-go')
    expect(page.locator('#diff-view')).to_be_visible(timeout=WAIT_MS)
    expect(page.locator('#status')).to_have_text('')
    expect(page.locator(f'#diff-flame g.frame[name*="{SLOW_FUNC}"]').first).to_be_attached(timeout=WAIT_MS)
    totals_text = page.locator('#diff-totals').inner_text().strip()
    m = DIFF_TOTALS.match(totals_text)
    assert m, totals_text
    page_totals = (int(m.group(1)), int(m.group(2)))
    api_diff = sk.api('GET', '/api/v1/flamegraph/diff?' + urllib.parse.urlencode({
        'base': tid1, 'target': tid1, 'base_start': base_range[0], 'base_end': base_range[1],
        'target_start': target_range[0], 'target_end': target_range[1]}))
    assert page_totals == (api_diff['base_total'], api_diff['target_total']), (totals_text, api_diff)
    task_total = sk.api('GET', f'/api/v1/tasks/{tid1}/flamegraph')['value']
    assert all(0 < n <= task_total for n in page_totals), (page_totals, task_total)
    if precise:
        in_range = [sk.api('GET', f'/api/v1/tasks/{tid1}/flamegraph?start={a}&end={b}')['value']
                    for a, b in (base_range, target_range)]
        assert list(page_totals) == in_range, (page_totals, in_range)
        assert sum(page_totals) == task_total, (page_totals, task_total)
    print(f'[browser] range compare of {tid1} with itself: {b_from}..{b_to} against {t_from}..{t_to} '
          f'(dumps {first}..{last}, split {"at a second" if precise else "impossible: same second"}): '
          f'{totals_text!r}, task total {task_total}, '
          f'{page.locator("#diff-flame g.frame").count()} frames')
    _shot(page, '#compare', 'compare.png')

    # 6. How long the page takes to render a 5,001-node flame graph (printed, not asserted).
    synth = _synthetic_flame()
    n_nodes = sum(1 for _ in _flame_nodes(synth))
    body = json.dumps(synth)
    perf = pages.new('perf')

    def is_task_flame(url):
        p = urllib.parse.urlparse(url)
        q = urllib.parse.parse_qs(p.query)
        return p.path == f'/api/v1/tasks/{tid1}/flamegraph' and q.get('format', ['json']) == ['json'] \
            and 'segment' not in q

    perf.route(is_task_flame, lambda route: route.fulfill(status=200, content_type='application/json',
                                                          body=body))
    started = time.monotonic()
    perf.goto(f'{sk.base}/#task={tid1}')
    perf.wait_for_function("""() => { const g = document.querySelector('#flame g.frame[name="synth-99-49"] rect');
        return g && +g.getAttribute('width') > 0; }""", timeout=60_000)
    drawn_s = time.monotonic() - started
    stats = perf.evaluate("""() => ({frames: document.querySelectorAll('#flame g.frame').length,
                                     nav_ms: Math.round(performance.now())})""")
    timings = perf.wait_for_function('n => window.skysnapTimings && window.skysnapTimings.flame_nodes === n '
                                     '&& window.skysnapTimings', arg=n_nodes).json_value()
    print(f'[browser] 5,000-node flame graph: {n_nodes} nodes, {stats["frames"]} g.frame drawn; '
          f'{drawn_s * 1000:.0f} ms from navigation to the last frame having its width '
          f'(performance.now() {stats["nav_ms"]} ms, includes d3\'s enter-transition delay); '
          f'the page itself: flame_draw_ms {timings["flame_draw_ms"]} (parsed JSON to the frames drawn, '
          f'next animation frame), flame_fetch_ms {timings["flame_fetch_ms"]} (request to parsed JSON, '
          f'intercepted answer), flame_nodes {timings["flame_nodes"]}')
    expect(perf.locator(f'#services .service[data-service="{svc1}"] .instance', has_text=inst1)) \
        .to_have_count(1, timeout=WAIT_MS)

    assert not pages.errors, pages.errors
    print(f'[browser] test body wall time {time.monotonic() - t0:.1f}s')


NOT_KEPT = 'no trace segment kept for this segment — it did not pass through this skysnap replica'


def _span_nodes(roots):
    """Every span of a span tree, in tree order."""
    pending = list(reversed(roots))
    while pending:
        span = pending.pop()
        yield span
        pending.extend(reversed(span.get('children') or []))


def _page_stack_counts(page):
    return page.eval_on_selector_all(
        '#stack-tree tr.stack-node',
        "rows => rows.map(r => +r.querySelector('.count').textContent.trim().replace(/[^0-9]/g, ''))")


def _analysis_orders(analysis):
    """The sample counts of an analysis in the API's order and in tree order."""
    return ([e['count'] for t in analysis['trees'] for e in t['elements']],
            [e['count'] for t in analysis['trees'] for e in _preorder_counts(t['elements'])])


def _analysis_requests(requests, segment_id):
    """The query of each /api/v1/analysis and segment flame-graph request seen, by path."""
    out = []
    for url in requests:
        p = urllib.parse.urlparse(url)
        q = urllib.parse.parse_qs(p.query)
        if q.get('segment') == [segment_id] and (p.path == '/api/v1/analysis' or p.path.endswith('/flamegraph')):
            out.append((p.path, q))
    return out


def _check_span_tree(page, sk, tid, seg, whole_analysis):
    """The segment list shows the kept trace segment; the segment view its span tree; a
    span's range is analysed exactly, and "Whole segment" goes back."""
    sid = seg['segment_id']
    quoted = urllib.parse.quote(sid, safe='')
    kept = sk.api('GET', f'/api/v1/segments/{quoted}')
    spans = list(_span_nodes(kept['spans']))
    entry = next(s for s in spans if s['operation_name'] == '/slow' and s['span_type'] == 'Entry')
    assert kept['segment']['trace_id'] == seg['trace_id'], (kept['segment'], seg)

    # The list row: endpoint, the trace segment's duration and its trace id.
    row = page.locator(f'#segments tr.segment[data-segment-id="{sid}"]')
    expect(row.locator('td.endpoint')).to_have_text('/slow', timeout=WAIT_MS)
    expect(row.locator('td.trace')).to_have_text(seg['trace_id'])
    duration = int(row.locator('td.seg-duration').inner_text())
    assert duration == seg['duration'] and duration >= 900, (duration, seg)

    # The span tree of the open segment, on its whole range.
    expect(page.locator('#span-tree tr.span')).to_have_count(len(spans), timeout=WAIT_MS)
    span_row = page.locator(f'#span-tree tr.span[data-span-id="{entry["span_id"]}"]')
    expect(span_row.locator('.op-name')).to_have_text('/slow')
    expect(span_row.locator('.span-type')).to_have_text('Entry')
    expect(page.locator('#span-tree-tip')).to_be_hidden()
    expect(page.locator('#segment-view')).to_have_attribute('data-shown', 'whole')
    expect(page.locator('#segment-range')).to_contain_text('Whole segment')
    expect(page.locator('#segment-whole')).to_be_hidden()
    expect(page.locator('#segment-meta')).to_contain_text(seg['trace_id'])

    # Choosing the span: both the stack tree and the flame graph ask for its range.
    requests = []
    record = lambda r: requests.append(r.url)  # noqa: E731
    page.on('request', record)
    span_row.click()
    shown = f'{entry["start_time"]}-{entry["end_time"]}'
    expect(page.locator('#segment-view')).to_have_attribute('data-shown', shown, timeout=WAIT_MS)
    asked = _analysis_requests(requests, sid)
    want = {'segment': [sid], 'start': [str(entry['start_time'])], 'end': [str(entry['end_time'])]}
    assert sorted(path for path, _ in asked) == ['/api/v1/analysis', f'/api/v1/tasks/{tid}/flamegraph'], asked
    assert all(q == want for _, q in asked), (asked, entry)
    span_analysis = sk.api('GET', f'/api/v1/analysis?segment={quoted}&start={entry["start_time"]}'
                                  f'&end={entry["end_time"]}')
    assert span_analysis['trees'], span_analysis  # the request's thread was sampled in its entry span
    assert _page_stack_counts(page) in _analysis_orders(span_analysis), (_page_stack_counts(page), span_analysis)
    expect(span_row).to_have_class(re.compile(r'\bselected\b'))
    expect(page.locator('#segment-range')).to_contain_text('Span range')
    expect(page.locator('#segment-range .range-op')).to_have_text('/slow')
    expect(page.locator('#segment-whole')).to_be_visible()
    expect(page.locator(f'#segment-flame g.frame[name*="{SLOW_FUNC}"]').first).to_be_attached(timeout=WAIT_MS)
    print(f'[browser] span /slow of {sid}: {len(spans)} span(s), analysis asked for '
          f'[{entry["start_time"]}, {entry["end_time"]}] ({entry["duration"]} ms), '
          f'{len(_page_stack_counts(page))} stack rows')
    _shot(page, '#segment-view', 'span-tree.png', 'span-tree-view.png')

    # Back to the whole segment: the request without a range, the whole tree again.
    requests.clear()
    page.click('#segment-whole')
    expect(page.locator('#segment-view')).to_have_attribute('data-shown', 'whole', timeout=WAIT_MS)
    asked = _analysis_requests(requests, sid)
    assert len(asked) == 2 and all(q == {'segment': [sid]} for _, q in asked), asked
    assert _page_stack_counts(page) in _analysis_orders(whole_analysis)
    expect(page.locator('#span-tree tr.span.selected')).to_have_count(0)
    expect(page.locator('#segment-range')).to_contain_text('Whole segment')
    expect(page.locator('#segment-whole')).to_be_hidden()
    page.remove_listener('request', record)


def _check_not_kept_and_synthetic(pages, sk, tid, seg, whole_analysis):
    """A segment whose trace segment skysnap did not keep (the API's 404, and null fields
    in the list) keeps its snapshot analysis; a nested span tree with markup in its names
    shows it as text, nests, collapses and analyses a child span's range."""
    sid = seg['segment_id']
    quoted = urllib.parse.quote(sid, safe='')
    page = pages.new('spans')
    is_segment = lambda url: urllib.parse.urlparse(url).path == f'/api/v1/segments/{quoted}'  # noqa: E731
    is_list = lambda url: urllib.parse.urlparse(url).path == f'/api/v1/tasks/{tid}/segments'  # noqa: E731

    def list_without_trace(route):
        items = route.fetch().json()
        for item in items:
            if item['segment_id'] == sid:
                item.update(trace_id=None, endpoint=None, start_time=None, duration=None, is_error=None)
        route.fulfill(status=200, content_type='application/json', body=json.dumps(items))

    not_found = json.dumps({'error': f'segment {sid} not found'})
    page.route(is_list, list_without_trace)
    page.route(is_segment, lambda route: route.fulfill(status=404, content_type='application/json', body=not_found))
    page.goto(f'{sk.base}/#task={tid}')
    row = page.locator(f'#segments tr.segment[data-segment-id="{sid}"]')
    expect(row.locator('td.endpoint')).to_have_text('—', timeout=WAIT_MS)
    expect(row.locator('td.seg-duration')).to_have_text('')
    expect(row.locator('td.trace')).to_have_text('')
    row.click()
    expect(page.locator('#span-tree-tip')).to_have_text(NOT_KEPT, timeout=WAIT_MS)
    expect(page.locator('#span-tree')).to_be_hidden()
    expect(page.locator('#segment-view')).to_have_attribute('data-shown', 'whole', timeout=WAIT_MS)
    assert _page_stack_counts(page) in _analysis_orders(whole_analysis)
    expect(page.locator('#segment-flame g.frame').first).to_be_attached(timeout=WAIT_MS)
    expect(page.locator('#status')).to_have_text('')
    _shot(page, '#segment-view', 'segment-not-kept.png')
    print(f'[browser] segment not kept: #span-tree-tip {page.locator("#span-tree-tip").inner_text()!r}, '
          f'{len(_page_stack_counts(page))} stack rows')

    # A nested tree around the real entry span, with markup in agent-sent names.
    kept = sk.api('GET', f'/api/v1/segments/{quoted}')
    root = next(s for s in kept['spans'] if s['operation_name'] == '/slow')
    t0, t1 = root['start_time'], root['end_time']
    markup = '<img src=x onerror="window.skysnapXss=1">'

    def span(span_id, parent, name, kind, layer, start, end, peer='', error=False, children=()):
        return {'span_id': span_id, 'parent_span_id': parent, 'operation_name': name, 'peer': peer,
                'span_type': kind, 'span_layer': layer, 'component_id': 7002, 'start_time': start,
                'end_time': end, 'duration': end - start, 'is_error': error, 'children': list(children)}
    db = span(2, 1, 'SELECT * FROM t WHERE a < b & c > d', 'Exit', 'Database', t0 + 150, t0 + 450,
              peer='db:5432', error=True)
    local = span(1, 0, markup, 'Local', 'Unknown', t0 + 100, t0 + 500, children=[db])
    http = span(3, 0, 'GET /downstream', 'Exit', 'Http', t0 + 550, t1 - 50, peer='127.0.0.1:9')
    tree = {'segment': kept['segment'],
            'spans': [dict(root, children=[local, http])]}
    page.unroute(is_segment)
    page.route(is_segment, lambda route: route.fulfill(status=200, content_type='application/json',
                                                       body=json.dumps(tree)))
    row.click()
    rows = page.locator('#span-tree tr.span')
    expect(rows).to_have_count(4, timeout=WAIT_MS)
    expect(page.locator('#span-tree-tip')).to_be_hidden()
    got = page.eval_on_selector_all('#span-tree tr.span', """rows => rows.map(r => [
        +r.dataset.spanId, +r.dataset.depth, r.querySelector('.op-name').textContent,
        r.querySelector('.span-type').textContent, !!r.querySelector('.badge.error')])""")
    assert got == [[0, 0, '/slow', 'Entry', False], [1, 1, markup, 'Local', False],
                   [2, 2, db['operation_name'], 'Exit', True], [3, 1, 'GET /downstream', 'Exit', False]], got
    assert page.evaluate('() => !document.querySelector("#span-tree img") && window.skysnapXss === undefined')
    requests = []
    page.on('request', lambda r: requests.append(r.url))
    page.locator('#span-tree tr.span[data-span-id="2"]').click()
    expect(page.locator('#segment-view')).to_have_attribute('data-shown', f'{t0 + 150}-{t0 + 450}', timeout=WAIT_MS)
    asked = _analysis_requests(requests, sid)
    assert len(asked) == 2 and all(q == {'segment': [sid], 'start': [str(t0 + 150)], 'end': [str(t0 + 450)]}
                                   for _, q in asked), asked
    range_analysis = sk.api('GET', f'/api/v1/analysis?segment={quoted}&start={t0 + 150}&end={t0 + 450}')
    assert _page_stack_counts(page) in _analysis_orders(range_analysis)
    expect(page.locator('#stack-tree-tip')).to_have_text(range_analysis.get('tip') or '')
    expect(page.locator('#segment-range .range-op')).to_have_text(db['operation_name'])
    # Collapsing the root hides its three spans; opening it shows them again.
    page.locator('#span-tree tr.span[data-span-id="0"] .toggle').click()
    expect(page.locator('#span-tree tr.span:visible')).to_have_count(1)
    expect(page.locator('#segment-view')).to_have_attribute('data-shown', f'{t0 + 150}-{t0 + 450}')
    page.locator('#span-tree tr.span[data-span-id="0"] .toggle').click()
    expect(page.locator('#span-tree tr.span:visible')).to_have_count(4)
    _shot(page, '#segment-view', 'span-tree-nested.png')
    assert not pages.errors, pages.errors


def _api_with_token(sk, method, path, token, body=None):
    req = urllib.request.Request(sk.base + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={'Content-Type': 'application/json',
                                          'Authorization': f'Bearer {token}'})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_admin_token_dialog(env, pages):
    sk = env.skysnap({'SKYSNAP_AUTH_ADMIN_TOKEN': 'secret'})
    task = _api_with_token(sk, 'POST', '/api/v1/tasks', 'secret',
                           {'service': unique('web-token'), 'endpoint_name': '/slow', 'duration': 1,
                            'min_duration_threshold': 100, 'dump_period': 20, 'max_sampling_count': 5})
    page = pages.new('token')
    page.goto(sk.base + '/')
    dialog = page.locator('#token-dialog')
    expect(dialog).to_be_visible(timeout=WAIT_MS)

    page.fill('#token-input', 'not-the-token')
    page.click('#token-submit')
    error = page.locator('#token-error')
    expect(error).to_be_visible(timeout=WAIT_MS)
    expect(error).to_have_text(re.compile(r'\S'))
    print(f'\n[browser] wrong token: #token-error {error.inner_text()!r}')

    page.fill('#token-input', 'secret')
    page.click('#token-submit')
    expect(page.locator(f'#tasks tr.task[data-task-id="{task["id"]}"]')).to_have_count(1, timeout=WAIT_MS)
    expect(dialog).to_be_hidden(timeout=WAIT_MS)
    assert not pages.errors, pages.errors
