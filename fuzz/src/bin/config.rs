//! AFL++ target `config`: `scripts/fuzz.sh <seconds> config` (see fuzz/README.md).
//! Outside afl-fuzz it reads one input from stdin, which replays a crash.

fn main() {
    // `fuzz!` installs a panic hook that aborts, so a panic on any thread is a crash.
    afl::fuzz!(|data: &[u8]| skysnap_fuzz::config::config(data));
}
