//! The command-line client subcommands (`skysnap task …`), talking to the HTTP API.

pub mod task;
