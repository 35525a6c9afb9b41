//! Small generators over `arbitrary::Unstructured` shared by the targets: values that
//! parsers mishandle more often than random bytes would reach by themselves.

use arbitrary::{Result, Unstructured};

/// Number texts at and around the limits of every integer type skysnap parses into.
pub const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "-0",
    "9",
    "10",
    "15",
    "16",
    "1023",
    "1024",
    "65535",
    "65536",
    "2147483647",
    "2147483648",
    "-2147483649",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999999999",
    "1e3",
    "1.5",
    "-1.5",
    "1e400",
    "NaN",
    "inf",
    " 12 ",
    "+7",
    "0x10",
    "1_000",
    "",
];

/// Texts with the characters that break naive handling.
pub const TEXTS: &[&str] = &[
    "",
    " ",
    "a",
    "/",
    "..",
    "../..",
    "%",
    "%00",
    "%zz",
    "&",
    "=",
    "?",
    "#",
    "+",
    "\0",
    "\n",
    "\r\n",
    "\t",
    "\"",
    "'",
    "\\",
    "{}",
    "[]",
    "null",
    "~",
    "true",
    "💥",
    "\u{202e}",
    "\u{feff}",
    "é",
    "'; DROP TABLE snapshot; --",
    "*",
    "%2F",
];

/// One of `NUMBERS`, an arbitrary `i64` or an arbitrary `u64`, as text.
pub fn number_text(u: &mut Unstructured) -> Result<String> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 | 1 => u.choose(NUMBERS)?.to_string(),
        2 => u.arbitrary::<i64>()?.to_string(),
        _ => u.arbitrary::<u64>()?.to_string(),
    })
}

/// A short text: one of `TEXTS`, one of `known`, arbitrary UTF-8, or one character
/// repeated up to 100,000 times.
pub fn text(u: &mut Unstructured, known: &[&str]) -> Result<String> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 | 1 => u.choose(TEXTS)?.to_string(),
        2 | 3 if !known.is_empty() => u.choose(known)?.to_string(),
        4 => number_text(u)?,
        5 => {
            let c = u.arbitrary::<char>()?;
            let count = if u.ratio(1, 8)? {
                u.int_in_range(1_000..=100_000usize)?
            } else {
                u.int_in_range(0..=300usize)?
            };
            std::iter::repeat_n(c, count).collect()
        }
        _ => u.arbitrary::<String>()?,
    })
}

/// Percent-encodes every byte that is not unreserved in a URI, so that any text (or
/// invalid UTF-8) can travel in a path segment or a query.
pub fn percent_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for &byte in bytes {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
