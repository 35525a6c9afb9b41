//! The flame graph as a gzipped pprof `profile.proto`, which `go tool pprof`, Pyroscope
//! and Grafana read. Two values per sample: `samples/count` and `wall/nanoseconds`
//! (samples × dump period); one sample per distinct stack. A frame's line number, where
//! the agent sent one (Java `class.method:line`, Python `file.func: line`), becomes the
//! location's line; functions and locations are shared by every stack that has them.

use std::io::Write as _;

use prost::Message as _;

use super::flame::FastMap;
use super::FlameTree;
use crate::proto::pprof;

const NANOS_PER_MILLI: i64 = 1_000_000;

/// A frame split into (function, file, line): `a.b.C.run:12` → (`a.b.C.run`, `a.b.C`,
/// 12); `/app/x.py.handle: 7` → (`/app/x.py.handle`, `/app/x.py`, 7). A frame without
/// a line keeps it whole as the function, line 0.
pub fn split_frame(frame: &str) -> (&str, &str, i64) {
    let (function, line) = match frame.rsplit_once(':') {
        Some((function, line)) => match line.trim().parse::<i64>() {
            Ok(line) if line >= 0 => (function.trim_end(), line),
            _ => (frame, 0),
        },
        None => (frame, 0),
    };
    let file = function
        .rsplit_once('.')
        .map(|(file, _)| file)
        .filter(|file| !file.is_empty())
        .unwrap_or(function);
    (function, file, line)
}

/// Builds the profile's string table, functions and locations as stacks come by.
struct ProfileBuilder<'a> {
    profile: pprof::Profile,
    strings: FastMap<&'a str, i64>,
    functions: FastMap<&'a str, u64>,
    locations: FastMap<(u64, i64), u64>,
}

impl<'a> ProfileBuilder<'a> {
    fn new() -> ProfileBuilder<'a> {
        let mut builder = ProfileBuilder {
            profile: pprof::Profile::default(),
            strings: FastMap::default(),
            functions: FastMap::default(),
            locations: FastMap::default(),
        };
        builder.string("");
        builder
    }

    fn string(&mut self, text: &'a str) -> i64 {
        if let Some(&index) = self.strings.get(text) {
            return index;
        }
        let index = self.profile.string_table.len() as i64;
        self.profile.string_table.push(text.to_string());
        self.strings.insert(text, index);
        index
    }

    fn location(&mut self, frame: &'a str) -> u64 {
        let (function_name, file, line) = split_frame(frame);
        let function_id = match self.functions.get(function_name) {
            Some(&id) => id,
            None => {
                let id = self.profile.function.len() as u64 + 1;
                let name = self.string(function_name);
                let filename = self.string(file);
                self.profile.function.push(pprof::Function {
                    id,
                    name,
                    system_name: name,
                    filename,
                    start_line: 0,
                });
                self.functions.insert(function_name, id);
                id
            }
        };
        *self
            .locations
            .entry((function_id, line))
            .or_insert_with(|| {
                let id = self.profile.location.len() as u64 + 1;
                self.profile.location.push(pprof::Location {
                    id,
                    mapping_id: 0,
                    address: 0,
                    line: vec![pprof::Line {
                        function_id,
                        line,
                        column: 0,
                    }],
                    is_folded: false,
                });
                id
            })
    }
}

/// The profile, gzipped, as a pprof file is stored. `start_time_ms` and `duration_ms`
/// say when the task ran.
pub fn encode(
    tree: &FlameTree,
    dump_period_ms: i64,
    start_time_ms: i64,
    duration_ms: i64,
) -> Vec<u8> {
    let period_nanos = dump_period_ms.max(0).saturating_mul(NANOS_PER_MILLI);
    let mut builder = ProfileBuilder::new();
    let samples = builder.string("samples");
    let count = builder.string("count");
    let wall = builder.string("wall");
    let nanoseconds = builder.string("nanoseconds");
    builder.profile.sample_type = vec![
        pprof::ValueType {
            r#type: samples,
            unit: count,
        },
        pprof::ValueType {
            r#type: wall,
            unit: nanoseconds,
        },
    ];
    builder.profile.period_type = Some(pprof::ValueType {
        r#type: wall,
        unit: nanoseconds,
    });
    builder.profile.period = period_nanos;
    builder.profile.default_sample_type = wall;
    builder.profile.time_nanos = start_time_ms.saturating_mul(NANOS_PER_MILLI);
    builder.profile.duration_nanos = duration_ms.saturating_mul(NANOS_PER_MILLI);

    // A frame's location is resolved once per distinct frame, not once per stack it
    // is in (0 = not resolved yet; pprof ids start at 1).
    let mut location_by_name = vec![0u64; tree.names().len()];
    let mut profile_samples = Vec::new();
    tree.for_each_path(|path, samples| {
        let location_id: Vec<u64> = path
            .iter()
            .rev()
            .map(|&node| {
                let slot = &mut location_by_name[tree.name_id(node) as usize];
                if *slot == 0 {
                    *slot = builder.location(tree.name(node));
                }
                *slot
            })
            .collect();
        let samples = i64::try_from(samples).unwrap_or(i64::MAX);
        profile_samples.push(pprof::Sample {
            location_id,
            value: vec![samples, samples.saturating_mul(period_nanos)],
            label: Vec::new(),
        });
    });
    builder.profile.sample = profile_samples;
    if tree.truncated_samples() > 0 {
        let comment = format!(
            "skysnap: {} samples were cut short at analysis.max_flamegraph_nodes",
            tree.truncated_samples()
        );
        builder.profile.string_table.push(comment);
        builder.profile.comment = vec![builder.profile.string_table.len() as i64 - 1];
    }
    let bytes = builder.profile.encode_to_vec();
    let mut gzip = flate2::write::GzEncoder::new(
        Vec::with_capacity(bytes.len() / 4),
        flate2::Compression::fast(),
    );
    gzip.write_all(&bytes)
        .expect("writing to a Vec cannot fail");
    gzip.finish().expect("writing to a Vec cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    pub fn decode(gzipped: &[u8]) -> pprof::Profile {
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(gzipped)
            .read_to_end(&mut bytes)
            .unwrap();
        pprof::Profile::decode(bytes.as_slice()).unwrap()
    }

    #[test]
    fn test_pprof_split_frame() {
        assert_eq!(
            split_frame("com.shop.Orders.list:42"),
            ("com.shop.Orders.list", "com.shop.Orders", 42)
        );
        assert_eq!(
            split_frame("/app/app.py.handler: 7"),
            ("/app/app.py.handler", "/app/app.py", 7)
        );
        assert_eq!(split_frame("native"), ("native", "native", 0));
        assert_eq!(split_frame("a.b:x"), ("a.b:x", "a", 0));
    }

    #[test]
    fn test_pprof_profile_round_trip() {
        let mut tree = FlameTree::new(100);
        tree.add(&["m.Main.main:1", "m.A.run:5", "m.A.hot:9"], 3);
        tree.add(&["m.Main.main:1", "m.A.run:6"], 1);
        tree.add(&["m.Main.main:1", "m.A.run:5"], 2);
        let profile = decode(&encode(&tree, 20, 1_000, 60_000));
        let text = |index: i64| profile.string_table[index as usize].as_str();
        assert_eq!(text(0), "");
        assert_eq!(
            profile
                .sample_type
                .iter()
                .map(|t| (text(t.r#type), text(t.unit)))
                .collect::<Vec<_>>(),
            [("samples", "count"), ("wall", "nanoseconds")]
        );
        assert_eq!(profile.period, 20_000_000);
        assert_eq!(profile.time_nanos, 1_000_000_000);
        assert_eq!(profile.duration_nanos, 60_000_000_000);
        // Three functions; run:5 and run:6 are two locations of one function.
        assert_eq!(profile.function.len(), 3);
        assert_eq!(profile.location.len(), 4);
        let frames = |sample: &pprof::Sample| -> Vec<String> {
            sample
                .location_id
                .iter()
                .map(|&id| {
                    let location = &profile.location[id as usize - 1];
                    assert_eq!(location.id, id);
                    let line = &location.line[0];
                    let function = &profile.function[line.function_id as usize - 1];
                    format!("{}:{}", text(function.name), line.line)
                })
                .collect()
        };
        let samples: Vec<(Vec<String>, Vec<i64>)> = profile
            .sample
            .iter()
            .map(|sample| (frames(sample), sample.value.clone()))
            .collect();
        assert_eq!(
            samples,
            [
                (
                    vec!["m.A.run:5".into(), "m.Main.main:1".into()],
                    vec![2, 40_000_000]
                ),
                (
                    vec![
                        "m.A.hot:9".into(),
                        "m.A.run:5".into(),
                        "m.Main.main:1".into()
                    ],
                    vec![3, 60_000_000]
                ),
                (
                    vec!["m.A.run:6".into(), "m.Main.main:1".into()],
                    vec![1, 20_000_000]
                ),
            ]
        );
    }
}
