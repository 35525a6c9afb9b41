//! The one place internal errors become gRPC statuses.

use actix::MailboxError;
use tonic::Status;

use crate::actors::sink::SinkError;
use crate::store::StoreError;

pub fn from_store(error: &StoreError) -> Status {
    match error {
        StoreError::Unavailable(_) | StoreError::Unusable(_) => {
            Status::unavailable(error.to_string())
        }
        StoreError::Rejected(_) => Status::internal(error.to_string()),
    }
}

pub fn from_sink(error: &SinkError) -> Status {
    // Final or not, the agent should send the stream again later: it was not committed.
    Status::unavailable(format!("snapshots not committed: {error}"))
}

pub fn from_mailbox(error: &MailboxError) -> Status {
    Status::unavailable(format!("skysnap is shutting down: {error}"))
}
