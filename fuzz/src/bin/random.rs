//! Random, not coverage-guided, inputs through the fuzz targets, for a machine without
//! AFL++ and to replay a corpus:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --bin random -- <target> [seconds] [seed]
//! cargo run --manifest-path fuzz/Cargo.toml --bin random -- <target> --replay <file>...
//! ```
//!
//! Inputs are fresh random bytes or mutations of the files in `fuzz/seeds/<target>/`.
//! On a panic (on any thread) the input is written to `fuzz/artifacts/<target>/` and
//! the process aborts.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The input being run, for the panic hook.
static CURRENT: Mutex<Vec<u8>> = Mutex::new(Vec::new());

fn seeds(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter_map(|path| std::fs::read(path).ok())
        .collect()
}

fn mutate(rng: &mut StdRng, input: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    for _ in 0..rng.random_range(1..=8) {
        let len = input.len();
        match rng.random_range(0..6) {
            0 if len > 0 => {
                let at = rng.random_range(0..len);
                input[at] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let at = rng.random_range(0..len);
                input[at] = rng.random();
            }
            2 => {
                let at = rng.random_range(0..=len);
                let count = rng.random_range(1..=16);
                let bytes: Vec<u8> = (0..count).map(|_| rng.random()).collect();
                input.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let at = rng.random_range(0..len);
                let end = (at + rng.random_range(1..=16)).min(len);
                input.drain(at..end);
            }
            4 if !seeds.is_empty() => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                let from = rng.random_range(0..=other.len());
                let at = rng.random_range(0..=len);
                input.splice(at..at, other[from..].iter().copied().take(64));
            }
            _ if len > 0 => input.truncate(rng.random_range(0..len)),
            _ => {}
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(name) = args.first() else {
        eprintln!("usage: random <target> [seconds] [seed] | random <target> --replay <file>...");
        eprintln!("targets: {}", skysnap_fuzz::TARGETS.join(", "));
        std::process::exit(2);
    };
    let target = skysnap_fuzz::run_target(name).unwrap_or_else(|| {
        eprintln!(
            "unknown target {name}: {}",
            skysnap_fuzz::TARGETS.join(", ")
        );
        std::process::exit(2);
    });
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let artifacts = manifest.join("artifacts").join(name);
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        let input = CURRENT
            .lock()
            .map(|input| input.clone())
            .unwrap_or_default();
        let _ = std::fs::create_dir_all(&artifacts);
        let path = artifacts.join(format!("crash-{}", std::process::id()));
        if std::fs::write(&path, &input).is_ok() {
            eprintln!("the input is in {}", path.display());
        }
        std::process::abort();
    }));

    if args.get(1).map(String::as_str) == Some("--replay") {
        for file in &args[2..] {
            let input = std::fs::read(file).unwrap_or_else(|error| panic!("{file}: {error}"));
            *CURRENT.lock().unwrap() = input.clone();
            target(&input);
        }
        skysnap_fuzz::http::drop_harness();
        println!("{name}: {} inputs replayed, no panic", args.len() - 2);
        return;
    }

    let seconds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let seed: u64 = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!("{name}: random inputs for {seconds} s, seed {seed}");
    let corpus = seeds(&manifest.join("seeds").join(name));
    let mut rng = StdRng::seed_from_u64(seed);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut cases = 0u64;
    while Instant::now() < deadline {
        for _ in 0..64 {
            let mut input = if !corpus.is_empty() && rng.random_bool(0.5) {
                corpus[rng.random_range(0..corpus.len())].clone()
            } else {
                let len = if rng.random_bool(0.9) {
                    rng.random_range(0..256)
                } else {
                    rng.random_range(0..16_384)
                };
                (0..len).map(|_| rng.random()).collect()
            };
            mutate(&mut rng, &mut input, &corpus);
            CURRENT.lock().unwrap().clone_from(&input);
            target(&input);
            cases += 1;
        }
    }
    skysnap_fuzz::http::drop_harness();
    println!("{name}: {cases} cases, no panic");
}
