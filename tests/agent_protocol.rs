//! The agent protocol against the real `skysnap serve` on loopback: task commands,
//! snapshot streams, duplicates, bad input, finish reports, management.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use serde_json::Value;
use skysnap::proto::compat::profile_task_client::ProfileTaskClient as CompatProfileTaskClient;
use skysnap::proto::v3::management_service_client::ManagementServiceClient;
use skysnap::proto::v3::{
    InstancePingPkg, InstanceProperties, KeyStringValuePair, ProfileTaskCommandQuery,
    ProfileTaskFinishReport, ThreadSnapshot, ThreadStack,
};
use tonic::codegen::http::uri::PathAndQuery;

use common::{eventually, snapshot, snapshot_rows, wait_for_commands, Server};

fn query(service: &str, instance: &str, last_command_time: i64) -> ProfileTaskCommandQuery {
    ProfileTaskCommandQuery {
        service: service.into(),
        service_instance: instance.into(),
        last_command_time,
    }
}

async fn logs(server: &Server, task_id: &str) -> Vec<Value> {
    let (status, logs) = server.get(&format!("/api/v1/tasks/{task_id}/logs")).await;
    assert_eq!(status, 200, "{logs}");
    logs.as_array().unwrap().clone()
}

#[tokio::test]
async fn test_commands_for_new_task_and_notified_once() {
    let mut server = Server::start(&[]);
    let task = server.create_task("shop", "/orders").await;
    let task_id = task["id"].as_str().unwrap();
    let create_time = task["create_time"].as_i64().unwrap();

    let mut client = server.profile_client().await;
    let commands = client
        .get_profile_task_commands(query("shop", "shop-1", -1))
        .await
        .unwrap()
        .into_inner()
        .commands;
    assert_eq!(commands.len(), 1);
    assert_eq!(commands[0].command, "ProfileTaskQuery");
    let args: HashMap<_, _> = commands[0]
        .args
        .iter()
        .map(|pair| (pair.key.as_str(), pair.value.as_str()))
        .collect();
    let expected = [
        ("TaskId", task_id.to_string()),
        ("EndpointName", "/orders".to_string()),
        ("Duration", "5".to_string()),
        ("MinDurationThreshold", "100".to_string()),
        ("DumpPeriod", "20".to_string()),
        ("MaxSamplingCount", "5".to_string()),
        (
            "StartTime",
            task["start_time"].as_i64().unwrap().to_string(),
        ),
        ("CreateTime", create_time.to_string()),
    ];
    assert_eq!(args.len(), 9, "{args:?}");
    for (key, value) in expected {
        assert_eq!(args[key], value, "arg {key}");
    }
    assert!(!args["SerialNumber"].is_empty());

    // An agent that already knows the task gets nothing.
    let none = client
        .get_profile_task_commands(query("shop", "shop-1", create_time))
        .await
        .unwrap()
        .into_inner();
    assert!(none.commands.is_empty());
    // Another service gets nothing.
    let other = client
        .get_profile_task_commands(query("other", "o-1", -1))
        .await
        .unwrap()
        .into_inner();
    assert!(other.commands.is_empty());

    // Polling again with an old lastCommandTime, also through the package-less compat
    // service, hands the command again but writes no second NOTIFIED row.
    let mut compat = CompatProfileTaskClient::connect(server.grpc.clone())
        .await
        .unwrap();
    for _ in 0..3 {
        client
            .get_profile_task_commands(query("shop", "shop-1", -1))
            .await
            .unwrap();
        let again = compat
            .get_profile_task_commands(query("shop", "shop-1", -1))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(again.commands.len(), 1);
    }
    client
        .get_profile_task_commands(query("shop", "shop-2", -1))
        .await
        .unwrap();
    let rows = eventually(Duration::from_secs(10), || async {
        let rows = logs(&server, task_id).await;
        (rows.len() >= 2).then_some(rows)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rows_after = logs(&server, task_id).await;
    assert_eq!(rows_after.len(), 2, "{rows_after:?}");
    let mut instances: Vec<_> = rows
        .iter()
        .map(|r| r["instance"].as_str().unwrap())
        .collect();
    instances.sort();
    assert_eq!(instances, ["shop-1", "shop-2"]);
    assert!(rows
        .iter()
        .all(|r| r["operation"] == "NOTIFIED" && r["service"] == "shop"));
    server.stop();
}

#[tokio::test]
async fn test_stream_of_10000_snapshots_readable_and_duplicates_collapsed() {
    let mut server = Server::start(&[]);
    let task = server.create_task("shop", "/orders").await;
    let task_id = task["id"].as_str().unwrap().to_string();
    let mut client = server.profile_client().await;

    let snapshots: Vec<ThreadSnapshot> = (0..10_000)
        .map(|n| snapshot(&task_id, &format!("segment-{}", n % 2), n / 2))
        .collect();
    client
        .collect_snapshot(tokio_stream::iter(snapshots.clone()))
        .await
        .expect("stream acknowledged");
    // The reply came after the commit: everything is readable at once.
    let (status, segments) = server
        .get(&format!("/api/v1/tasks/{task_id}/segments"))
        .await;
    assert_eq!(status, 200);
    let segments = segments.as_array().unwrap();
    assert_eq!(segments.len(), 2);
    for segment in segments {
        assert_eq!(segment["snapshot_count"], 5_000);
        assert_eq!(segment["first_dump_time"], 1_700_000_000_000i64);
        assert_eq!(segment["last_dump_time"], 1_700_000_000_000i64 + 4_999 * 20);
    }
    let (status, rows) = server.get("/api/v1/segments/segment-1/snapshots").await;
    assert_eq!(status, 200);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 5_000);
    for (index, row) in rows.iter().enumerate() {
        assert_eq!(row["sequence"], index as i64);
        assert_eq!(row["task_id"], task_id.as_str());
    }
    assert_eq!(rows[7]["stack"][0], "com.example.Service0.method0:1");
    assert_eq!(rows[7]["stack"].as_array().unwrap().len(), 10);

    // The whole stream again, plus duplicates inside one stream: no new row.
    let mut resend = snapshots[..3_000].to_vec();
    resend.extend(snapshots[..3_000].iter().cloned());
    client
        .collect_snapshot(tokio_stream::iter(resend))
        .await
        .expect("resend acknowledged");
    client
        .collect_snapshot(tokio_stream::iter(snapshots))
        .await
        .expect("resend acknowledged");
    assert_eq!(snapshot_rows(&server.db_path(), "segment-%"), 10_000);

    let received = server.metric("skysnap_snapshots_received_total", &[]).await;
    let committed = server
        .metric("skysnap_snapshots_committed_total", &[])
        .await;
    assert_eq!(received, 26_000.0);
    assert_eq!(committed, 26_000.0);
    server.stop();
}

#[tokio::test]
async fn test_bad_snapshots_rejected_and_counted_stream_continues() {
    let mut server = Server::start(&[("SKYSNAP_GRPC_MAX_STACK_DEPTH", "50")]);
    let mut client = server.profile_client().await;
    let good = |sequence| snapshot("task-bad", "segment-bad", sequence);
    let mut deep = good(90);
    deep.stack = Some(ThreadStack {
        code_signatures: (0..51).map(|n| format!("f{n}")).collect(),
    });
    let mut stream = vec![good(0)];
    stream.push(ThreadSnapshot {
        task_id: String::new(),
        ..good(91)
    });
    stream.push(good(1));
    stream.push(ThreadSnapshot {
        trace_segment_id: String::new(),
        ..good(92)
    });
    stream.push(ThreadSnapshot {
        sequence: -1,
        ..good(93)
    });
    stream.push(ThreadSnapshot {
        time: 0,
        ..good(94)
    });
    stream.push(ThreadSnapshot {
        time: -5,
        ..good(95)
    });
    stream.push(deep);
    stream.push(good(2));
    client
        .collect_snapshot(tokio_stream::iter(stream))
        .await
        .expect("bad snapshots do not end the stream");
    assert_eq!(snapshot_rows(&server.db_path(), "segment-bad"), 3);
    let rejected = |reason: &'static str| {
        let server = &server;
        async move {
            server
                .metric(
                    "skysnap_snapshots_rejected_total",
                    &[&format!("reason=\"{reason}\"")],
                )
                .await
        }
    };
    assert_eq!(rejected("empty_task_id").await, 1.0);
    assert_eq!(rejected("empty_segment_id").await, 1.0);
    assert_eq!(rejected("negative_sequence").await, 1.0);
    assert_eq!(rejected("invalid_time").await, 2.0);
    assert_eq!(rejected("stack_too_deep").await, 1.0);
    // The task id is unknown to skysnap: stored anyway, and counted.
    assert_eq!(
        server
            .metric("skysnap_snapshots_unknown_task_total", &[])
            .await,
        3.0
    );
    server.stop();
}

#[tokio::test]
async fn test_malformed_protobuf_ends_stream_and_keeps_committed() {
    let mut server = Server::start(&[]);
    let channel = tonic::transport::Endpoint::from_shared(server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    let mut messages: Vec<Bytes> = (0..20)
        .map(|n| Bytes::from(snapshot("task-m", "segment-m", n).encode_to_vec()))
        .collect();
    // Field 1 (taskId), length-delimited, with a length running past the message.
    messages.push(Bytes::from_static(&[0x0a, 0x7f, 0x41]));
    messages
        .extend((20..30).map(|n| Bytes::from(snapshot("task-m", "segment-m", n).encode_to_vec())));
    // Space the messages so the first ones reach the shards before the bad one.
    let paced = futures::StreamExt::then(tokio_stream::iter(messages), |message| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        message
    });
    grpc.ready().await.unwrap();
    let error = grpc
        .client_streaming(
            tonic::Request::new(paced),
            PathAndQuery::from_static("/skywalking.v3.ProfileTask/collectSnapshot"),
            skysnap::grpc::raw::RawCodec,
        )
        .await
        .expect_err("a malformed message ends the stream with an error");
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    // What was handed over before the bad message is committed and stays.
    assert_eq!(snapshot_rows(&server.db_path(), "segment-m"), 20);
    assert_eq!(
        server
            .metric(
                "skysnap_snapshots_rejected_total",
                &["reason=\"malformed\""]
            )
            .await,
        1.0
    );
    // The server is fine afterwards.
    let mut client = server.profile_client().await;
    client
        .collect_snapshot(tokio_stream::iter(vec![snapshot(
            "task-m",
            "segment-m2",
            0,
        )]))
        .await
        .unwrap();
    server.stop();
}

#[tokio::test]
async fn test_oversized_message_refused() {
    let mut server = Server::start(&[("SKYSNAP_GRPC_MAX_MESSAGE_BYTES", "65536")]);
    let mut client = server.profile_client().await;
    let mut huge = snapshot("task-o", "segment-o", 5);
    huge.stack = Some(ThreadStack {
        code_signatures: (0..100)
            .map(|n| format!("{n}:{}", "x".repeat(1_000)))
            .collect(),
    });
    let stream = futures::StreamExt::then(
        tokio_stream::iter(vec![
            snapshot("task-o", "segment-o", 0),
            snapshot("task-o", "segment-o", 1),
            huge,
            snapshot("task-o", "segment-o", 2),
        ]),
        |message| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            message
        },
    );
    let error = client
        .collect_snapshot(stream)
        .await
        .expect_err("oversized message refused");
    assert!(
        matches!(
            error.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{error:?}"
    );
    assert_eq!(snapshot_rows(&server.db_path(), "segment-o"), 2);
    // Unary calls are limited too.
    let error = client
        .get_profile_task_commands(query(&"s".repeat(70_000), "i", -1))
        .await
        .expect_err("oversized query refused");
    assert!(matches!(
        error.code(),
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
    ));
    server.stop();
}

#[tokio::test]
async fn test_report_task_finish_known_and_unknown() {
    let mut server = Server::start(&[]);
    let task = server.create_task("shop", "/orders").await;
    let task_id = task["id"].as_str().unwrap();
    let mut client = server.profile_client().await;
    for _ in 0..2 {
        client
            .report_task_finish(ProfileTaskFinishReport {
                service: "shop".into(),
                service_instance: "shop-1".into(),
                task_id: task_id.into(),
            })
            .await
            .unwrap();
    }
    client
        .report_task_finish(ProfileTaskFinishReport {
            service: "shop".into(),
            service_instance: "shop-1".into(),
            task_id: "no-such-task".into(),
        })
        .await
        .expect("unknown task ids are answered normally");
    let rows = eventually(Duration::from_secs(10), || async {
        let rows = logs(&server, task_id).await;
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(logs(&server, task_id).await.len(), 1);
    assert_eq!(rows[0]["operation"], "EXECUTION_FINISHED");
    assert_eq!(rows[0]["instance"], "shop-1");
    assert_eq!(server.get("/api/v1/tasks/no-such-task/logs").await.0, 404);
    assert_eq!(
        server
            .metric("skysnap_task_finish_unknown_total", &[])
            .await,
        1.0
    );
    server.stop();
}

#[tokio::test]
async fn test_task_created_on_other_replica_found_by_id() {
    // Two replicas on one SQLite file: the second learns the first's task from the
    // store (by-id miss → store; downstream cache → refresh).
    let mut first = Server::start(&[("SKYSNAP_TASKS_CACHE_REFRESH_INTERVAL_MS", "200")]);
    let mut second = Server::start_in(
        &first.dir,
        &[("SKYSNAP_TASKS_CACHE_REFRESH_INTERVAL_MS", "200")],
    );
    let task = first.create_task("shop", "/orders").await;
    let task_id = task["id"].as_str().unwrap();
    assert_eq!(second.get(&format!("/api/v1/tasks/{task_id}")).await.0, 200);
    let mut client = second.profile_client().await;
    wait_for_commands(&client, "shop", "shop-9", Duration::from_secs(5)).await;
    client
        .report_task_finish(ProfileTaskFinishReport {
            service: "shop".into(),
            service_instance: "shop-9".into(),
            task_id: task_id.into(),
        })
        .await
        .unwrap();
    second.stop();
    first.stop();
}

#[tokio::test]
async fn test_management_lists_live_instances() {
    let mut server = Server::start(&[]);
    let mut client = ManagementServiceClient::connect(server.grpc.clone())
        .await
        .unwrap();
    client
        .report_instance_properties(InstanceProperties {
            service: "shop".into(),
            service_instance: "shop-1".into(),
            properties: vec![KeyStringValuePair {
                key: "language".into(),
                value: "python".into(),
            }],
            layer: "GENERAL".into(),
        })
        .await
        .unwrap();
    client
        .keep_alive(InstancePingPkg {
            service: "shop".into(),
            service_instance: "shop-2".into(),
            layer: String::new(),
        })
        .await
        .unwrap();
    let (status, services) = server.get("/api/v1/services").await;
    assert_eq!(status, 200);
    assert_eq!(services[0]["service"], "shop");
    let instances = services[0]["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2);
    assert_eq!(instances[0]["name"], "shop-1");
    assert_eq!(instances[0]["properties"][0][1], "python");
    server.stop();
}

#[tokio::test]
async fn test_discarded_services_answer() {
    use skysnap::proto::v3::trace_segment_report_service_client::TraceSegmentReportServiceClient;
    use skysnap::proto::v3::SegmentObject;
    let mut server = Server::start(&[]);
    let mut client = TraceSegmentReportServiceClient::connect(server.grpc.clone())
        .await
        .unwrap();
    client
        .collect(tokio_stream::iter(vec![
            SegmentObject::default(),
            SegmentObject::default(),
        ]))
        .await
        .expect("segments accepted and dropped");
    assert_eq!(
        server
            .metric(
                "skysnap_discarded_messages_total",
                &[
                    "service=\"skywalking.v3.TraceSegmentReportService\"",
                    "method=\"collect\""
                ]
            )
            .await,
        2.0
    );
    server.stop();
}
