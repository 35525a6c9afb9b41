//! The profiling page at `/`: its own small HTML, CSS and JavaScript (`web/`) and the
//! vendored flame-graph library (`web/vendor/`), embedded in the binary at compile time,
//! so that skysnap serves it with nothing else installed and nothing fetched from the
//! internet. The page reads the same `/api/v1` as every other client.

use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, ApiPath};

/// (name under `/assets/`, content type, bytes).
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../../web/style.css"),
    ),
    (
        "vendor/d3.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/vendor/d3.min.js"),
    ),
    (
        "vendor/d3-flamegraph.umd.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/vendor/d3-flamegraph.umd.min.js"),
    ),
    (
        "vendor/LICENSE-d3",
        "text/plain; charset=utf-8",
        include_bytes!("../../web/vendor/LICENSE-d3"),
    ),
    (
        "vendor/LICENSE-d3-flame-graph",
        "text/plain; charset=utf-8",
        include_bytes!("../../web/vendor/LICENSE-d3-flame-graph"),
    ),
];

const INDEX_HTML: &[u8] = include_bytes!("../../web/index.html");

/// Scripts and styles from skysnap only; the flame-graph library injects its own
/// `<style>` element, hence the inline styles.
const POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'";

fn embedded(content_type: &'static str, bytes: &'static [u8]) -> Response {
    (
        [
            (CONTENT_TYPE, content_type),
            // The files change with the binary, which the browser cannot see: revalidate.
            (CACHE_CONTROL, "no-cache"),
            (CONTENT_SECURITY_POLICY, POLICY),
        ],
        bytes,
    )
        .into_response()
}

/// `GET /`: the page.
pub async fn index() -> Response {
    embedded("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /assets/{*path}`: the page's scripts, styles and the vendored libraries.
pub async fn asset(ApiPath(path): ApiPath<String>) -> Result<Response, ApiError> {
    ASSETS
        .iter()
        .find(|(name, _, _)| *name == path)
        .map(|(_, content_type, bytes)| embedded(content_type, bytes))
        .ok_or_else(|| ApiError::NotFound(format!("no asset {path}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_page_assets_are_named_once_and_not_empty() {
        let mut names: Vec<&str> = ASSETS.iter().map(|(name, _, _)| *name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ASSETS.len());
        assert!(ASSETS.iter().all(|(_, _, bytes)| !bytes.is_empty()));
        let index = std::str::from_utf8(INDEX_HTML).unwrap();
        for script in [
            "assets/vendor/d3.min.js",
            "assets/vendor/d3-flamegraph.umd.min.js",
            "assets/app.js",
        ] {
            assert!(index.contains(script), "index.html loads {script}");
        }
    }
}
