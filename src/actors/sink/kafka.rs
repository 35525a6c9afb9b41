//! The Kafka sink: each snapshot becomes one message on the topic, value = the
//! `ThreadSnapshot` protobuf bytes (what SkyWalking's own Kafka fetcher reads), key =
//! the segment id, so a segment's snapshots stay in one partition and in order.
//! librdkafka batches (`linger.ms`); the producer is idempotent with `acks=all`. A full
//! local queue is backpressure: the batch waits for room.

use std::borrow::Cow;
use std::time::Duration;

use async_trait::async_trait;
use prost::Message;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use super::{SinkError, SnapshotSink};
use crate::config::KafkaConfig;
use crate::model::SnapshotRecord;
use crate::proto::v3::{ThreadSnapshot, ThreadStack};

pub struct KafkaSink {
    producer: FutureProducer,
    topic: String,
}

/// The client settings shared by the producer and the consumer.
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", config.brokers.trim());
    for (key, value) in &config.properties {
        client.set(key, value);
    }
    client
}

/// The wire form of a snapshot, as agents send it: the agent's own bytes when the
/// receiver kept them, else encoded from the record.
pub fn encode(record: &SnapshotRecord) -> Cow<'_, [u8]> {
    if let Some(encoded) = &record.encoded {
        return Cow::Borrowed(encoded);
    }
    let snapshot = ThreadSnapshot {
        task_id: record.task_id.clone(),
        trace_segment_id: record.segment_id.clone(),
        time: record.dump_time,
        sequence: record.sequence,
        stack: Some(ThreadStack {
            code_signatures: record.stack.to_vec(),
        }),
    };
    Cow::Owned(snapshot.encode_to_vec())
}

/// Everything librdkafka reports is worth another try except a refused configuration
/// or an oversized message.
fn sink_error(error: &KafkaError) -> SinkError {
    let code = error.rdkafka_error_code();
    let final_error = matches!(
        code,
        Some(RDKafkaErrorCode::MessageSizeTooLarge)
            | Some(RDKafkaErrorCode::InvalidConfig)
            | Some(RDKafkaErrorCode::TopicAuthorizationFailed)
            | Some(RDKafkaErrorCode::ClusterAuthorizationFailed)
            | Some(RDKafkaErrorCode::InvalidRecord)
    ) || matches!(error, KafkaError::ClientCreation(_));
    SinkError {
        sink: "kafka",
        message: error.to_string(),
        retriable: !final_error,
    }
}

/// The producer of the sink and of `skysnap consume`'s dead-letter topic: idempotent,
/// `acks=all`, partitioned by key like the agents' own reporter.
pub fn producer(config: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
    client_config(config)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // The Java agent's Kafka reporter partitions with murmur2 as well.
        .set("partitioner", "murmur2_random")
        .set("linger.ms", config.linger_ms.to_string())
        .set("batch.num.messages", "10000")
        .set("compression.type", "lz4")
        .set("message.timeout.ms", config.message_timeout_ms.to_string())
        .create()
}

impl KafkaSink {
    pub fn new(config: &KafkaConfig) -> Result<KafkaSink, KafkaError> {
        Ok(KafkaSink {
            producer: producer(config)?,
            topic: config.topic.clone(),
        })
    }
}

#[async_trait]
impl SnapshotSink for KafkaSink {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn wants_encoded(&self) -> bool {
        true
    }

    async fn write(&self, batch: &[SnapshotRecord]) -> Result<(), SinkError> {
        let mut deliveries = Vec::with_capacity(batch.len());
        for record in batch {
            let payload = encode(record);
            let mut message = FutureRecord::to(&self.topic)
                .key(record.segment_id.as_bytes())
                .payload(payload.as_ref());
            loop {
                match self.producer.send_result(message) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                        // librdkafka's queue is full: wait for deliveries to make room.
                        message = returned;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((error, _)) => return Err(sink_error(&error)),
                }
            }
        }
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((error, _))) => return Err(sink_error(&error)),
                Err(_) => {
                    return Err(SinkError {
                        sink: "kafka",
                        message: "producer dropped a delivery".to_string(),
                        retriable: true,
                    })
                }
            }
        }
        Ok(())
    }

    async fn ready(&self) -> Result<(), SinkError> {
        let producer = self.producer.clone();
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || {
            let metadata = producer
                .client()
                .fetch_metadata(Some(&topic), Timeout::After(Duration::from_secs(3)))
                .map_err(|error| sink_error(&error))?;
            let found = metadata
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
            if found {
                Ok(())
            } else {
                Err(SinkError {
                    sink: "kafka",
                    message: format!("topic {topic} not found"),
                    retriable: true,
                })
            }
        })
        .await
        .map_err(|error| SinkError {
            sink: "kafka",
            message: error.to_string(),
            retriable: true,
        })?
    }

    async fn close(&self) {
        let producer = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
    }
}
