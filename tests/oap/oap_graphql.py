"""Queries a real Apache SkyWalking OAP 10.1.0 through its GraphQL API (standard library only).

The OAP comes from scripts/services/oap.sh (GraphQL at http://127.0.0.1:22800/graphql by
default). Typical use in a test:

    import oap_graphql as oap
    base = 'http://127.0.0.1:22800'
    sid = oap.service_id('my-service')
    oap.wait_for(lambda: oap.find_service(base, 'my-service'), 60, 'service listed')
    traces = oap.wait_for(lambda: oap.basic_traces(base, sid), 60, 'traces')

Facts of OAP 10.1.0 that these functions rely on:
  * service id = base64(name) + '.1'; instance id = service id + '_' + base64(instance name).
  * A Duration is {start, end, step}; with step MINUTE the times are 'yyyy-MM-dd HHmm' in the
    server's time zone (taken from getTimeInfo, so client and server may differ).
  * queryTraces does not exist in 10.1.0: queryBasicTraces lists trace segments.
  * Metrics are read with MQE: execExpression(expression, entity, duration).
  * Data become visible after the OAP's persistent period (3 s in scripts/oap/config) and the
    service list after its service cache refresh (3 s there), on top of the agent's own
    report periods.
"""

import base64
import datetime
import json
import time
import urllib.error
import urllib.request

DEFAULT_BASE = 'http://127.0.0.1:22800'


class GraphQLError(RuntimeError):
    """The OAP answered with GraphQL errors (or not with JSON)."""


def query(base, gql, variables=None, timeout=15):
    """POSTs one GraphQL query to BASE/graphql; returns its `data`, or raises GraphQLError."""
    body = json.dumps({'query': gql, 'variables': variables or {}}).encode()
    req = urllib.request.Request(base.rstrip('/') + '/graphql', data=body, method='POST',
                                 headers={'Content-Type': 'application/json',
                                          'Accept': 'application/json'})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        raise GraphQLError(f'HTTP {e.code}: {e.read().decode("utf-8", "replace")[:2000]}') from e
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise GraphQLError(f'not JSON: {raw[:2000]!r}') from e
    if doc.get('errors'):
        raise GraphQLError(json.dumps(doc['errors'])[:4000])
    return doc.get('data')


def wait_for(predicate, timeout, desc='condition', interval=1.0):
    """Polls predicate() until it returns a truthy value and returns that value. A predicate
    that raises (OAP not answering yet, GraphQL error) counts as falsy. Raises TimeoutError
    after `timeout` seconds, naming `desc` and the last value or exception."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except (OSError, GraphQLError) as e:  # URLError is an OSError
            last = e
        if time.monotonic() >= deadline:
            raise TimeoutError(f'timed out after {timeout:.0f}s waiting for {desc}; last: {last!r}'[:4000])
        time.sleep(interval)


# ---- ids and durations ---------------------------------------------------------------

def _b64(s):
    return base64.b64encode(s.encode()).decode()


def service_id(name):
    """OAP's id of a normal (agent-reported) service: base64(name) + '.1'."""
    return f'{_b64(name)}.1'


def instance_id(service, instance):
    """OAP's id of a service instance: service id + '_' + base64(instance name)."""
    return f'{service_id(service)}_{_b64(instance)}'


def endpoint_id(service, endpoint):
    """OAP's id of an endpoint: service id + '_' + base64(endpoint name)."""
    return f'{service_id(service)}_{_b64(endpoint)}'


_TZ_CACHE = {}


def server_tz(base):
    """The OAP's time zone (a datetime.timezone), from getTimeInfo { timezone } ('+0800')."""
    tz = _TZ_CACHE.get(base)
    if tz is None:
        info = query(base, '{ getTimeInfo { timezone currentTimestamp } }')['getTimeInfo']
        z = info['timezone'] or '+0000'
        sign = -1 if z.startswith('-') else 1
        z = z.lstrip('+-')
        tz = datetime.timezone(sign * datetime.timedelta(hours=int(z[:2]), minutes=int(z[2:4] or 0)))
        _TZ_CACHE[base] = tz
    return tz


def duration(base, minutes_back=15, minutes_ahead=1):
    """A MINUTE-step Duration covering [now - minutes_back, now + minutes_ahead] in the
    server's local time."""
    now = datetime.datetime.now(server_tz(base))
    fmt = '%Y-%m-%d %H%M'
    return {'start': (now - datetime.timedelta(minutes=minutes_back)).strftime(fmt),
            'end': (now + datetime.timedelta(minutes=minutes_ahead)).strftime(fmt),
            'step': 'MINUTE'}


# ---- metadata ------------------------------------------------------------------------

def list_services(base, layer='GENERAL'):
    """[{id, name, group, shortName, layers, normal}] of the layer (GENERAL: agent services)."""
    return query(base, '''query ($layer: String) {
        listServices(layer: $layer) { id name group shortName layers normal } }''',
                 {'layer': layer})['listServices']


def find_service(base, name, layer='GENERAL'):
    """The service named NAME from listServices(layer), or None."""
    for s in list_services(base, layer):
        if s['name'] == name:
            return s
    return None


def list_instances(base, service_name, minutes_back=15):
    """[{id, name, language, instanceUUID, attributes: [{name, value}]}] of a service."""
    return query(base, '''query ($d: Duration!, $sid: ID!) {
        listInstances(duration: $d, serviceId: $sid) {
            id name language instanceUUID attributes { name value } } }''',
                 {'d': duration(base, minutes_back), 'sid': service_id(service_name)})['listInstances']


def find_endpoints(base, service_name, keyword=None, limit=50):
    """[{id, name}] of the service's endpoints (optionally matching keyword)."""
    return query(base, '''query ($sid: ID!, $kw: String, $limit: Int!) {
        findEndpoint(serviceId: $sid, keyword: $kw, limit: $limit) { id name } }''',
                 {'sid': service_id(service_name), 'kw': keyword, 'limit': limit})['findEndpoint']


# ---- traces and logs -----------------------------------------------------------------

def basic_traces(base, service_name, minutes_back=15, page_size=20, endpoint=None, instance=None):
    """[{segmentId, endpointNames, duration, start, isError, traceIds}] of the service, newest
    first (queryBasicTraces, traceState ALL)."""
    cond = {'serviceId': service_id(service_name),
            'queryDuration': duration(base, minutes_back),
            'traceState': 'ALL', 'queryOrder': 'BY_START_TIME',
            'paging': {'pageNum': 1, 'pageSize': page_size}}
    if endpoint is not None:
        cond['endpointId'] = endpoint_id(service_name, endpoint)
    if instance is not None:
        cond['serviceInstanceId'] = instance_id(service_name, instance)
    return query(base, '''query ($c: TraceQueryCondition) {
        queryBasicTraces(condition: $c) {
            traces { segmentId endpointNames duration start isError traceIds } } }''',
                 {'c': cond})['queryBasicTraces']['traces']


def trace(base, trace_id):
    """The spans of one trace: [{traceId, segmentId, spanId, parentSpanId, serviceCode,
    serviceInstanceName, startTime, endTime, endpointName, type, peer, component, isError,
    layer, tags: [{key, value}]}]."""
    return query(base, '''query ($id: ID!) { queryTrace(traceId: $id) { spans {
        traceId segmentId spanId parentSpanId serviceCode serviceInstanceName startTime endTime
        endpointName type peer component isError layer tags { key value } } } }''',
                 {'id': trace_id})['queryTrace']['spans']


def logs(base, service_name, minutes_back=15, page_size=50, keywords=None, instance=None):
    """[{serviceName, serviceInstanceName, endpointName, traceId, timestamp, contentType,
    content, tags: [{key, value}]}] of the service, newest first (queryLogs). `keywords`
    (content search) is not supported by H2 storage."""
    cond = {'serviceId': service_id(service_name),
            'queryDuration': duration(base, minutes_back),
            'paging': {'pageNum': 1, 'pageSize': page_size},
            'queryOrder': 'DES'}
    if instance is not None:
        cond['serviceInstanceId'] = instance_id(service_name, instance)
    if keywords:
        cond['keywordsOfContent'] = list(keywords)
    data = query(base, '''query ($c: LogQueryCondition) {
        queryLogs(condition: $c) { errorReason logs {
            serviceName serviceId serviceInstanceName serviceInstanceId endpointName traceId
            timestamp contentType content tags { key value } } } }''', {'c': cond})['queryLogs']
    if data.get('errorReason'):
        raise GraphQLError(f'queryLogs: {data["errorReason"]}')
    return data['logs']


# ---- metrics (MQE) -------------------------------------------------------------------

def list_metrics(base, regex=None):
    """[{name, type, catalog}] of the metrics the OAP defines (OAL and MAL), e.g.
    regex='meter_instance_pvm_.*' lists the Python agent meters from python-runtime.yaml.
    A definition only says that the rule is loaded, not that data arrived."""
    return query(base, '''query ($r: String) { listMetrics(regex: $r) { name type catalog } }''',
                 {'r': regex})['listMetrics']


def exec_expression(base, expression, service_name, instance=None, endpoint=None, minutes_back=15):
    """Runs an MQE expression over the last minutes on a service (or one of its instances or
    endpoints). Returns {type, error, results: [{metric: {labels}, values: [{id, value}]}]};
    `value` is None for the minutes without data."""
    entity = {'serviceName': service_name, 'normal': True}
    if instance is not None:
        entity['serviceInstanceName'] = instance
    if endpoint is not None:
        entity['endpointName'] = endpoint
    return query(base, '''query ($e: String!, $ent: Entity!, $d: Duration!) {
        execExpression(expression: $e, entity: $ent, duration: $d) {
            type error results { metric { labels { key value } } values { id value } } } }''',
                 {'e': expression, 'ent': entity, 'd': duration(base, minutes_back)})['execExpression']


def metric_values(base, expression, service_name, instance=None, endpoint=None, minutes_back=15):
    """The non-null values (floats) of an MQE expression's time series; [] when there are
    none yet. Raises GraphQLError if the expression itself is rejected (unknown metric, ...)."""
    r = exec_expression(base, expression, service_name, instance, endpoint, minutes_back)
    if r.get('error'):
        raise GraphQLError(f'execExpression({expression!r}): {r["error"]}')
    out = []
    for series in r['results']:
        for v in series['values']:
            if v['value'] not in (None, '', 'null'):
                out.append(float(v['value']))
    return out
