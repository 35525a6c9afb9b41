//! The config loader: a YAML file and `SKYSNAP_*` variables through
//! `Config::load_with_env`, as `skysnap serve` and `skysnap consume` start.

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use serde_yaml::{Mapping, Value};
use skysnap::config::Config;

use crate::gen;

/// The documented example: the best seed there is, edited line by line below.
const EXAMPLE: &str = include_str!("../../config/skysnap.yaml");

/// YAML scalars and shapes that a key may be given instead of the one it expects.
const YAML_VALUES: &[&str] = &[
    "~",
    "null",
    "''",
    "true",
    "false",
    "yes",
    "on",
    "0",
    "-1",
    "1",
    "1024",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "1e400",
    ".inf",
    ".nan",
    "0x10",
    "0o17",
    "1_000",
    "0.5",
    "sqlite",
    "clickhouse",
    "direct",
    "kafka",
    "discard",
    "127.0.0.1:0",
    "'[::1]:65535'",
    "0.0.0.0:99999",
    "localhost:80",
    "http://127.0.0.1:8123",
    "[]",
    "[a, b]",
    "['', 'x://y']",
    "{}",
    "{a: 1}",
    "&a [*a]",
    "*undefined",
    "!!binary aGVsbG8=",
    "!custom x",
    "|\n    text",
    "\"\\u0000\"",
    "'%'",
];

/// (section, key, default value) of every configuration key.
fn keys() -> &'static [(String, String, Value)] {
    static KEYS: OnceLock<Vec<(String, String, Value)>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let Value::Mapping(sections) =
            serde_yaml::to_value(Config::default()).expect("the default config serialises")
        else {
            unreachable!("the default config is a mapping")
        };
        let mut keys = Vec::new();
        for (section, values) in sections {
            let (Value::String(section), Value::Mapping(values)) = (section, values) else {
                continue;
            };
            for (key, value) in values {
                if let Value::String(key) = key {
                    keys.push((section.clone(), key, value));
                }
            }
        }
        keys
    })
}

fn scalar_text(u: &mut Unstructured) -> Result<String> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 | 1 => u.choose(YAML_VALUES)?.to_string(),
        2 => gen::number_text(u)?,
        _ => gen::text(u, &[])?,
    })
}

fn value(u: &mut Unstructured, default: &Value, depth: u32) -> Result<Value> {
    Ok(match u.int_in_range(0..=9u8)? {
        0 => default.clone(),
        1 => Value::Null,
        2 => Value::Bool(u.arbitrary()?),
        3 => Value::Number(u.arbitrary::<i64>()?.into()),
        4 => Value::Number(u.arbitrary::<u64>()?.into()),
        5 => Value::Number(u.arbitrary::<f64>()?.into()),
        6 if depth < 3 => {
            let items = u.int_in_range(0..=3usize)?;
            Value::Sequence(
                (0..items)
                    .map(|_| value(u, default, depth + 1))
                    .collect::<Result<_>>()?,
            )
        }
        7 if depth < 3 => {
            let mut mapping = Mapping::new();
            for _ in 0..u.int_in_range(0..=3usize)? {
                mapping.insert(
                    Value::String(gen::text(u, &["a", "security.protocol"])?),
                    value(u, default, depth + 1)?,
                );
            }
            Value::Mapping(mapping)
        }
        // A scalar as YAML reads it: `yes`, `0x10`, `.nan`, …
        _ => serde_yaml::from_str(&scalar_text(u)?).unwrap_or(Value::Null),
    })
}

/// A file built as a tree of known (and some unknown) sections and keys.
fn structured_yaml(u: &mut Unstructured) -> Result<String> {
    let mut root = Mapping::new();
    for _ in 0..u.int_in_range(0..=6usize)? {
        let (section, key, default) = u.choose(keys())?;
        let section = if u.ratio(1, 16)? {
            gen::text(u, &["grpc_", "Grpc", ""])?
        } else {
            section.clone()
        };
        let key = if u.ratio(1, 16)? {
            gen::text(u, &["addr ", "max-message-bytes"])?
        } else {
            key.clone()
        };
        let entry = root
            .entry(Value::String(section))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if u.ratio(1, 16)? {
            *entry = value(u, default, 0)?;
        } else if let Value::Mapping(section) = entry {
            section.insert(Value::String(key), value(u, default, 0)?);
        }
    }
    let root = if u.ratio(1, 16)? {
        value(u, &Value::Null, 0)?
    } else {
        Value::Mapping(root)
    };
    Ok(serde_yaml::to_string(&root).unwrap_or_default())
}

/// The documented example with a few lines changed: a value swapped, a line dropped,
/// doubled or re-indented.
fn edited_example(u: &mut Unstructured) -> Result<String> {
    let mut lines: Vec<String> = EXAMPLE.lines().map(str::to_string).collect();
    for _ in 0..u.int_in_range(1..=4usize)? {
        let index = u.choose_index(lines.len())?;
        match u.int_in_range(0..=4u8)? {
            0 => {
                lines.remove(index);
            }
            1 => {
                let line = lines[index].clone();
                lines.insert(index, line);
            }
            2 => lines[index] = format!(" {}", lines[index]),
            _ => {
                if let Some((name, _)) = lines[index].split_once(':') {
                    lines[index] = format!("{name}: {}", scalar_text(u)?);
                }
            }
        }
        if lines.is_empty() {
            break;
        }
    }
    Ok(lines.join("\n"))
}

fn yaml_opt(u: &mut Unstructured) -> Result<Option<String>> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 => None,
        1 => Some(u.arbitrary::<String>()?),
        2 | 3 => Some(edited_example(u)?),
        _ => Some(structured_yaml(u)?),
    })
}

fn env_pairs(u: &mut Unstructured) -> Result<Vec<(String, String)>> {
    let mut env = Vec::new();
    for _ in 0..u.int_in_range(0..=6usize)? {
        let (section, key, default) = u.choose(keys())?;
        let name = match u.int_in_range(0..=9u8)? {
            0 => format!("SKYSNAP_{section}_{key}"),
            1 => u
                .choose(&[
                    "SKYSNAP_",
                    "SKYSNAP_GRPC",
                    "SKYSNAP__ADDR",
                    "SKYSNAP_SERVER",
                    "SKYSNAP_CONFIG",
                    "SKYSNAP_LOG",
                    "SKYSNAP_SERVICE_HOST",
                    "SKYSNAP_SERVICE_PORT_GRPC",
                    "SKYSNAP_PORT",
                    "SKYSNAP_PORT_11800_TCP_ADDR",
                    "SKYSNAP_KAFKA_PROPERTIES",
                    "PATH",
                ])?
                .to_string(),
            2 => format!("SKYSNAP_{}", gen::text(u, &["GRPC_ADR", "grpc_addr"])?),
            _ => format!("SKYSNAP_{section}_{key}").to_ascii_uppercase(),
        };
        let raw = match default {
            Value::Sequence(_) if u.ratio(1, 2)? => {
                let items: Vec<String> = (0..u.int_in_range(0..=3usize)?)
                    .map(|_| scalar_text(u))
                    .collect::<Result<_>>()?;
                items.join(",")
            }
            _ => scalar_text(u)?,
        };
        env.push((name, raw));
    }
    Ok(env)
}

thread_local! {
    /// One file per process, rewritten for each input.
    static FOLDER: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

fn write(name: &str, text: &str) -> PathBuf {
    FOLDER.with(|folder| {
        let mut folder = folder.borrow_mut();
        let folder = folder.get_or_insert_with(|| tempfile::tempdir().expect("temp dir"));
        let path = folder.path().join(name);
        std::fs::write(&path, text).expect("config file written");
        path
    })
}

/// A YAML file (or none) and `SKYSNAP_*` variables through the loader. An accepted
/// configuration, written back as YAML and loaded again, is the same configuration.
pub fn config(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(yaml_opt) = yaml_opt(&mut u) else {
        return;
    };
    let env = env_pairs(&mut u).unwrap_or_default();
    let path_opt = yaml_opt.map(|yaml| write("skysnap.yaml", &yaml));
    let config = match Config::load_with_env(path_opt.as_deref(), &env) {
        Ok(config) => config,
        Err(error) => {
            // The message names what failed; it is what an operator reads.
            let message = error.to_string();
            assert!(!message.is_empty());
            return;
        }
    };
    let written = serde_yaml::to_string(&config).expect("an accepted config serialises");
    let path = write("written.yaml", &written);
    match Config::load_with_env(Some(&path), &[]) {
        Ok(again) => assert_eq!(again, config, "written back as:\n{written}"),
        Err(error) => panic!("an accepted config, written back, is refused: {error}\n{written}"),
    }
}
