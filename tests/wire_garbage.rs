//! The gRPC port under hostile bytes, against the real `skysnap serve` binary: random
//! bytes on raw TCP connections, a valid HTTP/2 preface followed by garbage, truncated
//! or oversized frames, connections that stall mid-frame, a 1 MB header, and gRPC
//! messages whose 5-byte prefix lies (a wrong length, a compressed flag with no
//! encoding, a length of 4 GB). Each must end in a clear gRPC status, a stream reset or
//! a closed connection within a time limit; afterwards the process is still up, answers
//! `/healthz` and a normal `getProfileTaskCommands`, and its resident memory stays under
//! `RSS_LIMIT_KIB`.

mod common;

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use common::Server;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skysnap::proto::v3::ProfileTaskCommandQuery;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest the server may take to answer or close after the client is done.
const ANSWER_LIMIT: Duration = Duration::from_secs(10);

/// Resident memory the server may hold after a barrage: it starts at about 45 MiB and
/// ends at 50 to 70 MiB here; the 1 MB headers, 4 GB length prefixes and stalled
/// connections must not stay in memory.
const RSS_LIMIT_KIB: u64 = 150 * 1024;

/// Most the server's resident memory may grow over three more rounds of the same bad
/// requests: a leak per request would show here.
const GROWTH_LIMIT_KIB: u64 = 24 * 1024;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const COMMANDS_PATH: &str = "/skywalking.v3.ProfileTask/getProfileTaskCommands";
const SNAPSHOT_PATH: &str = "/skywalking.v3.ProfileTask/collectSnapshot";

/// HTTP/2 frame types (RFC 9113 §6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn grpc_addr(server: &Server) -> String {
    server.grpc.trim_start_matches("http://").to_string()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc status")
}

fn frame_header(length: u32, kind: u8, flags: u8, stream: u32) -> Vec<u8> {
    let mut header = length.to_be_bytes()[1..].to_vec();
    header.extend([kind, flags]);
    header.extend((stream & 0x7fff_ffff).to_be_bytes());
    header
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = frame_header(payload.len() as u32, kind, flags, stream);
    bytes.extend_from_slice(payload);
    bytes
}

/// HPACK integer with a `prefix_bits`-bit prefix (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, prefix_bits: u32, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header block of literal fields without indexing, no Huffman coding.
fn hpack_block(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in headers {
        block.push(0x00);
        hpack_int(&mut block, 0, 7, name.len());
        block.extend_from_slice(name.as_bytes());
        hpack_int(&mut block, 0, 7, value.len());
        block.extend_from_slice(value.as_bytes());
    }
    block
}

fn grpc_request_headers(path: &str) -> Vec<u8> {
    hpack_block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "127.0.0.1"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ])
}

/// A gRPC message: the compressed flag, the length the prefix claims, the bytes.
fn grpc_message(compressed: u8, claimed_length: u32, body: &[u8]) -> Bytes {
    let mut message = BytesMut::with_capacity(5 + body.len());
    message.put_u8(compressed);
    message.put_u32(claimed_length);
    message.put_slice(body);
    message.freeze()
}

/// What the server sent on a raw connection before it closed it.
#[derive(Debug)]
struct RawEnding {
    /// Bytes the server sent (its SETTINGS, acknowledgements, a GOAWAY).
    received_bytes: usize,
    /// Error code of the GOAWAY frame the server sent, if any.
    goaway_opt: Option<u32>,
}

/// The GOAWAY error code among the frames the server sent (after its SETTINGS).
fn find_goaway(mut bytes: &[u8]) -> Option<u32> {
    while bytes.len() >= 9 {
        let length = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        let kind = bytes[3];
        let payload = bytes.get(9..9 + length)?;
        if kind == GOAWAY && payload.len() >= 8 {
            return Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
        }
        bytes = &bytes[9 + length..];
    }
    None
}

/// Sends `bytes` on a fresh connection, half-closes it when `half_close`, and reads
/// until the server closes it; panics if the server neither closes nor answers in time.
async fn send_raw(addr: &str, bytes: &[u8], half_close: bool, what: &str) -> RawEnding {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The server may close before it read everything: a reset here is an answer.
    let _ = stream.write_all(bytes).await;
    if half_close {
        let _ = stream.shutdown().await;
    }
    let mut received = Vec::new();
    let started = Instant::now();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let left = ANSWER_LIMIT.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buffer)).await {
            Err(_) => panic!(
                "{what}: the server neither closed the connection nor stopped sending within \
                 {ANSWER_LIMIT:?} ({} bytes received)",
                received.len()
            ),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(read)) => received.extend_from_slice(&buffer[..read]),
        }
    }
    RawEnding {
        received_bytes: received.len(),
        goaway_opt: find_goaway(&received),
    }
}

/// How one h2 request ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The gRPC status (code, message) from the headers or trailers.
    Status(i32, String),
    /// An HTTP status without a gRPC status (e.g. 431 for oversized headers).
    Http(u16),
    /// The stream was reset, or the connection closed (the reason as text).
    Reset(String),
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Outcome> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_string();
    Some(Outcome::Status(code, message))
}

/// One gRPC call over a fresh h2 connection: the request headers plus `extra_headers`,
/// then `messages` as DATA, then the end of the stream. Panics on no answer in time.
async fn h2_call(
    addr: &str,
    path: &str,
    extra_headers: &[(&str, String)],
    messages: Vec<Bytes>,
) -> Outcome {
    let call = async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (client, connection) = h2::client::Builder::new()
            .max_frame_size(16_384)
            .handshake::<_, Bytes>(tcp)
            .await
            .expect("h2 handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut client = client.ready().await.expect("h2 ready");
        let mut request = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (name, value) in extra_headers {
            request = request.header(*name, value.as_str());
        }
        let request = request.body(()).expect("request");
        let (response, mut body) = match client.send_request(request, false) {
            Ok(sent) => sent,
            Err(error) => return Outcome::Reset(error.to_string()),
        };
        let count = messages.len();
        for (index, message) in messages.into_iter().enumerate() {
            // Flow control is the server's to give; a 4 GB prefix needs no more bytes.
            body.reserve_capacity(message.len());
            if let Err(error) = body.send_data(message, index + 1 == count) {
                return Outcome::Reset(error.to_string());
            }
        }
        if count == 0 {
            let _ = body.send_data(Bytes::new(), true);
        }
        let response = match response.await {
            Ok(response) => response,
            Err(error) => return Outcome::Reset(error.to_string()),
        };
        if let Some(outcome) = grpc_status(response.headers()) {
            return outcome;
        }
        let status = response.status().as_u16();
        let mut received = response.into_body();
        while let Some(chunk) = received.data().await {
            match chunk {
                Ok(chunk) => {
                    let _ = received.flow_control().release_capacity(chunk.len());
                }
                Err(error) => return Outcome::Reset(error.to_string()),
            }
        }
        match received.trailers().await {
            Ok(Some(trailers)) => grpc_status(&trailers).unwrap_or(Outcome::Http(status)),
            Ok(None) => Outcome::Http(status),
            Err(error) => Outcome::Reset(error.to_string()),
        }
    };
    tokio::time::timeout(ANSWER_LIMIT, call)
        .await
        .unwrap_or_else(|_| panic!("{path}: no status, reset or close within {ANSWER_LIMIT:?}"))
}

/// The server process is alive and serves both ports normally.
async fn assert_still_serving(server: &Server) {
    let pid = server.pid();
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "skysnap exited:\n{}",
        server.stderr()
    );
    let (status, body) = server.get("/healthz").await;
    assert_eq!(status, 200, "{body}");
    let mut client = server.profile_client().await;
    let commands = tokio::time::timeout(
        ANSWER_LIMIT,
        client.get_profile_task_commands(ProfileTaskCommandQuery {
            service: "wire-check".into(),
            service_instance: "i".into(),
            last_command_time: 0,
        }),
    )
    .await
    .expect("getProfileTaskCommands answers in time")
    .expect("getProfileTaskCommands succeeds");
    assert!(commands.into_inner().commands.is_empty());
}

fn assert_rss_bounded(server: &Server, before_kib: u64) {
    let after_kib = rss_kib(server.pid());
    println!("skysnap RSS: {before_kib} KiB before the barrage, {after_kib} KiB after");
    assert!(
        after_kib < RSS_LIMIT_KIB,
        "RSS {after_kib} KiB after the barrage, over {RSS_LIMIT_KIB} KiB (was {before_kib})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_wire_garbage_bytes_and_frames_close_the_connection() {
    let server = Server::start(&[]);
    let addr = grpc_addr(&server);
    assert_still_serving(&server).await;
    let before_kib = rss_kib(server.pid());

    // Random bytes, some sent whole and left open, some followed by a half-close.
    let seed: u64 = std::env::var("SKYSNAP_TEST_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!("random bytes from seed {seed} (SKYSNAP_TEST_SEED)");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut connections = Vec::new();
    for index in 0..200 {
        let length = if index % 10 == 0 {
            rng.random_range(16_384..262_144)
        } else {
            rng.random_range(1..2_048)
        };
        let mut bytes: Vec<u8> = (0..length).map(|_| rng.random()).collect();
        // Never the preface by chance: a first byte other than 'P'.
        if bytes[0] == b'P' {
            bytes[0] = b'Q';
        }
        let addr = addr.clone();
        connections.push(tokio::spawn(async move {
            send_raw(&addr, &bytes, index % 2 == 0, "random bytes").await
        }));
    }
    for connection in connections {
        connection.await.expect("random-bytes connection task");
    }

    // A valid preface, then random frames: the server answers GOAWAY and closes.
    let mut goaways = 0;
    for _ in 0..100 {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(SETTINGS, 0, 0, &[]));
        let length = rng.random_range(9..4_096);
        bytes.extend((0..length).map(|_| rng.random::<u8>()));
        let ending = send_raw(&addr, &bytes, true, "preface then random frames").await;
        // The server spoke HTTP/2 (its SETTINGS at least) before it closed.
        assert!(
            ending.received_bytes >= 9,
            "preface then random frames: {ending:?}"
        );
        goaways += usize::from(ending.goaway_opt.is_some());
    }
    println!("preface then random frames: {goaways} of 100 closed with a GOAWAY");

    // A frame header that promises more than is ever sent, then the end of the stream.
    let mut truncated = PREFACE.to_vec();
    truncated.extend(frame_header(100, SETTINGS, 0, 0));
    truncated.extend([0u8; 10]);
    let ending = send_raw(&addr, &truncated, true, "truncated SETTINGS").await;
    println!("truncated SETTINGS: {ending:?}");

    // Truncated inside a request: valid headers, then half a DATA frame.
    let mut half_request = PREFACE.to_vec();
    half_request.extend(frame(SETTINGS, 0, 0, &[]));
    half_request.extend(frame(
        HEADERS,
        END_HEADERS,
        1,
        &grpc_request_headers(COMMANDS_PATH),
    ));
    half_request.extend(frame_header(1_000, DATA, END_STREAM, 1));
    half_request.extend(grpc_message(0, 995, &[0x0a, 0x01]));
    let ending = send_raw(&addr, &half_request, true, "half a DATA frame").await;
    println!("half a DATA frame: {ending:?}");

    // A frame larger than the 16 KiB maximum frame size: FRAME_SIZE_ERROR (0x6).
    let mut oversized = PREFACE.to_vec();
    oversized.extend(frame(SETTINGS, 0, 0, &[]));
    oversized.extend(frame_header(0xff_ffff, HEADERS, END_HEADERS, 1));
    oversized.extend(vec![0u8; 32 * 1024]);
    let ending = send_raw(&addr, &oversized, false, "16 MiB frame header").await;
    assert_eq!(ending.goaway_opt, Some(0x6), "16 MiB frame: {ending:?}");

    // A header block that is not HPACK (indexes past the table): PROTOCOL_ERROR (0x1)
    // or COMPRESSION_ERROR (0x9).
    let mut bad_hpack = PREFACE.to_vec();
    bad_hpack.extend(frame(SETTINGS, 0, 0, &[]));
    bad_hpack.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0xff; 64]));
    let ending = send_raw(&addr, &bad_hpack, false, "bad HPACK").await;
    assert!(
        matches!(ending.goaway_opt, Some(0x1) | Some(0x9)),
        "bad HPACK: {ending:?}"
    );

    // DATA on a stream that was never opened: PROTOCOL_ERROR (0x1) or STREAM_CLOSED (0x5).
    let mut stray_data = PREFACE.to_vec();
    stray_data.extend(frame(SETTINGS, 0, 0, &[]));
    stray_data.extend(frame(DATA, 0, 7, b"stray"));
    let ending = send_raw(&addr, &stray_data, false, "DATA on an idle stream").await;
    assert!(
        matches!(ending.goaway_opt, Some(0x1) | Some(0x5)),
        "DATA on an idle stream: {ending:?}"
    );

    // A window update of zero on the connection: PROTOCOL_ERROR (0x1).
    let mut zero_window = PREFACE.to_vec();
    zero_window.extend(frame(SETTINGS, 0, 0, &[]));
    zero_window.extend(frame(WINDOW_UPDATE, 0, 0, &0u32.to_be_bytes()));
    let ending = send_raw(&addr, &zero_window, false, "zero window update").await;
    assert_eq!(
        ending.goaway_opt,
        Some(0x1),
        "zero window update: {ending:?}"
    );

    // A CONTINUATION flood: a header block that never ends, 16 MiB of it. The server
    // must cut it off (GOAWAY) rather than buffer it.
    let mut flood = PREFACE.to_vec();
    flood.extend(frame(SETTINGS, 0, 0, &[]));
    flood.extend(frame(HEADERS, 0, 1, &grpc_request_headers(COMMANDS_PATH)));
    let filler = hpack_block(&[("x-flood", &"a".repeat(16_000))]);
    for _ in 0..1_024 {
        flood.extend(frame(CONTINUATION, 0, 1, &filler));
    }
    let ending = send_raw(&addr, &flood, false, "CONTINUATION flood").await;
    assert!(
        ending.goaway_opt.is_some(),
        "CONTINUATION flood: {ending:?}"
    );
    println!("CONTINUATION flood: {ending:?}");

    // Connections that stall mid-frame and stay open must not stall the others.
    let mut stalled = Vec::new();
    for _ in 0..200 {
        let mut stream = TcpStream::connect(&addr).await.expect("connect");
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame_header(100, HEADERS, END_HEADERS, 1));
        bytes.extend([0x82, 0x86]);
        stream.write_all(&bytes).await.expect("stalled write");
        stalled.push(stream);
    }
    assert_still_serving(&server).await;
    drop(stalled);

    assert_still_serving(&server).await;
    assert_rss_bounded(&server, before_kib);
}

/// Prints the outcome of one case and checks it.
fn check(case: &str, outcome: Outcome, accept: &dyn Fn(&Outcome) -> bool) {
    println!("{case}: {outcome:?}");
    assert!(accept(&outcome), "{case}: {outcome:?}");
}

fn is_status(codes: &'static [i32]) -> impl Fn(&Outcome) -> bool {
    move |outcome: &Outcome| matches!(outcome, Outcome::Status(code, _) if codes.contains(code))
}

/// Huge headers and gRPC messages whose prefix lies, each checked for its answer.
async fn lying_requests(addr: &str) {
    // A valid ProfileTaskCommandQuery: service "s" (field 1), instance "i" (field 2).
    let query: &[u8] = &[0x0a, 0x01, b's', 0x12, 0x01, b'i'];
    let valid = grpc_message(0, query.len() as u32, query);
    let outcome = h2_call(addr, COMMANDS_PATH, &[], vec![valid.clone()]).await;
    assert_eq!(
        outcome,
        Outcome::Status(0, String::new()),
        "the raw call works"
    );

    // 1 MB of metadata: above the 16 KiB header list the server takes. Refused whole:
    // 431, a reset stream or a GOAWAY, never buffered.
    for size in [20_000, 1_000_000] {
        let junk = "a".repeat(size);
        let outcome = h2_call(
            addr,
            COMMANDS_PATH,
            &[("x-junk", junk)],
            vec![valid.clone()],
        )
        .await;
        check(&format!("{size}-byte header"), outcome, &|outcome| {
            matches!(outcome, Outcome::Http(431) | Outcome::Reset(_))
                || matches!(outcome, Outcome::Status(code, _) if *code != 0)
        });
    }
    // Many medium headers that add up to 1 MB.
    let many: Vec<(String, String)> = (0..100)
        .map(|index| (format!("x-junk-{index}"), "b".repeat(10_000)))
        .collect();
    let many_refs: Vec<(&str, String)> = many
        .iter()
        .map(|(name, value)| (name.as_str(), value.clone()))
        .collect();
    let outcome = h2_call(addr, COMMANDS_PATH, &many_refs, vec![valid.clone()]).await;
    check("100 headers of 10 kB", outcome, &|outcome| {
        matches!(outcome, Outcome::Http(431) | Outcome::Reset(_))
            || matches!(outcome, Outcome::Status(code, _) if *code != 0)
    });

    // A prefix claiming 4 GB: refused on the prefix (tonic answers OUT_OF_RANGE, 11;
    // RESOURCE_EXHAUSTED, 8, would do too), with nothing allocated for it.
    let outcome = h2_call(
        addr,
        COMMANDS_PATH,
        &[],
        vec![grpc_message(0, u32::MAX, query)],
    )
    .await;
    check("4 GB length prefix", outcome, &is_status(&[8, 11]));
    let outcome = h2_call(
        addr,
        SNAPSHOT_PATH,
        &[],
        vec![grpc_message(0, u32::MAX, query)],
    )
    .await;
    check(
        "4 GB length prefix on the snapshot stream",
        outcome,
        &is_status(&[8, 11]),
    );
    // Just over grpc.max_message_bytes (4 MiB).
    let outcome = h2_call(
        addr,
        COMMANDS_PATH,
        &[],
        vec![grpc_message(0, 4 * 1024 * 1024 + 1, query)],
    )
    .await;
    check("4 MiB + 1 length prefix", outcome, &is_status(&[8, 11]));

    // A prefix claiming more than the stream holds: the stream ends mid-message.
    let outcome = h2_call(addr, COMMANDS_PATH, &[], vec![grpc_message(0, 100, query)]).await;
    check(
        "length prefix longer than the message",
        outcome,
        &is_status(&[13, 3]),
    );
    // A prefix claiming less: the rest is read as a second, broken message.
    let outcome = h2_call(addr, COMMANDS_PATH, &[], vec![grpc_message(0, 2, query)]).await;
    check(
        "length prefix shorter than the message",
        outcome,
        &|outcome| matches!(outcome, Outcome::Status(code, _) if *code != 0),
    );
    // Half a prefix.
    let outcome = h2_call(
        addr,
        COMMANDS_PATH,
        &[],
        vec![Bytes::from_static(&[0, 0, 0])],
    )
    .await;
    check("3 bytes of a 5-byte prefix", outcome, &is_status(&[13, 3]));
    // Compressed flag set, no grpc-encoding: INTERNAL (13).
    let outcome = h2_call(
        addr,
        COMMANDS_PATH,
        &[],
        vec![grpc_message(1, query.len() as u32, query)],
    )
    .await;
    check(
        "compressed flag without grpc-encoding",
        outcome,
        &is_status(&[13]),
    );
    // A flag that is neither 0 nor 1.
    let outcome = h2_call(
        addr,
        COMMANDS_PATH,
        &[],
        vec![grpc_message(7, query.len() as u32, query)],
    )
    .await;
    check("compressed flag 7", outcome, &is_status(&[13]));
    // gzip announced, garbage sent.
    let outcome = h2_call(
        addr,
        COMMANDS_PATH,
        &[("grpc-encoding", "gzip".to_string())],
        vec![grpc_message(1, 16, &[0xab; 16])],
    )
    .await;
    check(
        "gzip flag with bytes that are not gzip",
        outcome,
        &is_status(&[13]),
    );
    // An encoding the server does not take: UNIMPLEMENTED (12).
    let outcome = h2_call(
        addr,
        COMMANDS_PATH,
        &[("grpc-encoding", "br".to_string())],
        vec![grpc_message(1, query.len() as u32, query)],
    )
    .await;
    check("grpc-encoding br", outcome, &is_status(&[12, 13]));
    // A gzip bomb: 64 MiB of zeros in about 64 KiB, over grpc.max_message_bytes once
    // inflated.
    let bomb = {
        use std::io::Write as _;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1024 * 1024];
        for _ in 0..64 {
            encoder.write_all(&zeros).expect("gzip");
        }
        encoder.finish().expect("gzip")
    };
    let outcome = h2_call(
        addr,
        SNAPSHOT_PATH,
        &[("grpc-encoding", "gzip".to_string())],
        vec![grpc_message(1, bomb.len() as u32, &bomb)],
    )
    .await;
    check(
        "gzip bomb (64 MiB inflated)",
        outcome,
        &is_status(&[8, 11, 13]),
    );
    // A well-framed message that is not protobuf.
    let outcome = h2_call(
        addr,
        COMMANDS_PATH,
        &[],
        vec![grpc_message(0, 8, &[0xff; 8])],
    )
    .await;
    check(
        "a message that is not protobuf",
        outcome,
        &is_status(&[13, 3]),
    );
    // Random prefixes and bodies on the snapshot stream.
    let mut rng = StdRng::seed_from_u64(12);
    for round in 0..50 {
        let messages: Vec<Bytes> = (0..rng.random_range(1..5))
            .map(|_| {
                let body: Vec<u8> = (0..rng.random_range(0..300))
                    .map(|_| rng.random())
                    .collect();
                let claimed = match rng.random_range(0..4) {
                    0 => body.len() as u32,
                    1 => rng.random(),
                    _ => rng.random_range(0..400),
                };
                grpc_message(rng.random_range(0..3), claimed, &body)
            })
            .collect();
        let outcome = h2_call(addr, SNAPSHOT_PATH, &[], messages).await;
        assert!(
            matches!(outcome, Outcome::Status(..) | Outcome::Reset(_)),
            "random gRPC messages, round {round}: {outcome:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_wire_huge_headers_and_lying_grpc_prefixes_get_a_status() {
    let server = Server::start(&[]);
    let addr = grpc_addr(&server);
    assert_still_serving(&server).await;
    let before_kib = rss_kib(server.pid());
    lying_requests(&addr).await;
    let first_round_kib = rss_kib(server.pid());
    // The same again: whatever the first round left in memory (allocator caches, HPACK
    // tables of closed connections) must not grow round after round.
    for _ in 0..3 {
        lying_requests(&addr).await;
    }
    let last_round_kib = rss_kib(server.pid());
    println!(
        "skysnap RSS after round 1: {first_round_kib} KiB, after round 4: {last_round_kib} KiB"
    );
    assert!(
        last_round_kib < first_round_kib + GROWTH_LIMIT_KIB,
        "RSS grew from {first_round_kib} KiB to {last_round_kib} KiB over three more rounds"
    );
    assert_still_serving(&server).await;
    assert_rss_bounded(&server, before_kib);
}
