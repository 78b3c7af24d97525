//! The billing dashboard and GraphiQL: static files compiled into the binary from
//! `/dashboard` (see its README), so both work with no network. The handlers only look a
//! path up and set the headers; the dashboard talks to the public GraphQL API like any client.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, guard, web};
use sha2::{Digest, Sha256};
use std::sync::LazyLock;

/// One embedded file, served at `/dashboard/assets/<path>` (path relative to `/dashboard`).
pub struct Asset {
    pub path: &'static str,
    pub body: &'static [u8],
}

macro_rules! embed {
    ($($path:literal),* $(,)?) => {
        &[$(Asset { path: $path, body: include_bytes!(concat!("../../dashboard/", $path)) }),*]
    };
}

/// Every file the pages load. `tests::every_file_is_embedded` fails when one is missing.
pub static ASSETS: &[Asset] = embed![
    "index.html",
    "app/api.js",
    "app/errors.js",
    "app/format.js",
    "app/live.js",
    "app/main.js",
    "app/session.js",
    "app/store.js",
    "app/style.css",
    "app/ui.js",
    "app/views/account.js",
    "app/views/history.js",
    "app/views/money.js",
    "app/views/settings.js",
    "app/views/workspace.js",
    "graphiql/index.html",
    "graphiql/init.js",
    "vendor/graphiql@3.8.3/graphiql.min.css",
    "vendor/graphiql@3.8.3/graphiql.min.js",
    "vendor/graphql-ws@6.4.2/umd/graphql-ws.min.js",
    "vendor/htm@3.1.1/dist/htm.mjs",
    "vendor/preact@11.2.0/dist/preact.mjs",
    "vendor/preact@11.2.0/hooks/dist/hooks.mjs",
    "vendor/react-dom@18.3.1/umd/react-dom.production.min.js",
    "vendor/react@18.3.1/umd/react.production.min.js",
    "vendor/uplot@1.6.32/dist/uPlot.esm.js",
    "vendor/uplot@1.6.32/dist/uPlot.min.css",
];

/// The vendored packages' manifest (names, versions, integrity, file hashes).
pub const VENDOR_MANIFEST: &str = include_str!("../../dashboard/vendor/MANIFEST.json");

/// Strong ETags of the files, computed once.
static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| format!("\"{}\"", &hex::encode(Sha256::digest(a.body))[..32]))
        .collect()
});

/// The dashboard page's Content-Security-Policy: its own origin only (the WebSocket too),
/// and the inline import map by its hash.
static DASHBOARD_CSP: LazyLock<String> = LazyLock::new(|| {
    let page = find("index.html").map_or(&b""[..], |(_, a)| a.body);
    let page = String::from_utf8_lossy(page);
    let import_map = page
        .split_once("<script type=\"importmap\">")
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map_or("", |(map, _)| map);
    format!(
        "default-src 'self'; script-src 'self' 'sha256-{}'; style-src 'self' 'unsafe-inline'; \
         img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; \
         frame-ancestors 'none'",
        base64(&Sha256::digest(import_map.as_bytes()))
    )
});

fn find(path: &str) -> Option<(usize, &'static Asset)> {
    ASSETS.iter().enumerate().find(|(_, a)| a.path == path)
}

pub fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

/// Vendored files carry their version in the path and never change: cached for a year.
/// The pages and the app's own files are revalidated (ETag) on every load.
fn cache_control(path: &str) -> &'static str {
    if path.starts_with("vendor/") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    }
}

fn serve(req: &HttpRequest, path: &str) -> HttpResponse {
    let Some((index, asset)) = find(path) else {
        return HttpResponse::NotFound()
            .content_type("text/plain; charset=utf-8")
            .body("not found");
    };
    let etag = ETAGS.get(index).map_or("", String::as_str);
    let not_modified = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim() == etag));
    let mut response = if not_modified {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    response
        .insert_header((header::CONTENT_TYPE, content_type(path)))
        .insert_header((header::CACHE_CONTROL, cache_control(path)))
        .insert_header((header::ETAG, etag))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"));
    if not_modified {
        return response.finish();
    }
    response.body(asset.body)
}

/// `GET` (and `HEAD`) `/`, `/dashboard` and `/dashboard/assets/{path}`.
pub fn routes(config: &mut web::ServiceConfig) {
    let get_or_head = || web::route().guard(guard::Any(guard::Get()).or(guard::Head()));
    config
        .route("/", get_or_head().to(graphiql))
        .route("/dashboard", get_or_head().to(page))
        .route("/dashboard/", get_or_head().to(page))
        .route("/dashboard/assets/{path:.*}", get_or_head().to(asset));
}

/// GET /dashboard: the single-page app.
pub async fn page(req: HttpRequest) -> HttpResponse {
    let mut response = serve(&req, "index.html");
    if let Ok(csp) = HeaderValue::from_str(&DASHBOARD_CSP) {
        response
            .headers_mut()
            .insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    response
}

/// GET /dashboard/assets/{path}: the app's files and the vendored libraries.
pub async fn asset(req: HttpRequest, path: web::Path<String>) -> HttpResponse {
    serve(&req, &path)
}

/// GET /: GraphiQL, from the same embedded files (no CDN).
pub async fn graphiql(req: HttpRequest) -> HttpResponse {
    serve(&req, "graphiql/index.html")
}

/// Standard base64 with padding (for the CSP hash; no crate for 20 lines).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboard");

    fn files_under(dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read dashboard dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                files_under(&path, out);
            } else if let Ok(rel) = path.strip_prefix(ROOT) {
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }

    /// Every page, script and stylesheet under /dashboard is compiled in (a file added to
    /// the app but not to ASSETS would be a 404 in the browser).
    #[test]
    fn every_file_is_embedded() {
        let mut files = Vec::new();
        files_under(Path::new(ROOT), &mut files);
        for file in files {
            let served = [".html", ".js", ".mjs", ".css"]
                .iter()
                .any(|ext| file.ends_with(ext));
            if served {
                assert!(find(&file).is_some(), "dashboard/{file} is not in ASSETS");
            }
        }
    }

    /// The committed vendored files are exactly the npm files the manifest names
    /// (dashboard/vendor/check-npm compares them with the registry's tarballs).
    #[test]
    fn vendored_files_match_the_manifest() {
        let manifest: serde_json::Value =
            serde_json::from_str(VENDOR_MANIFEST).expect("MANIFEST.json parses");
        let packages = manifest["packages"].as_array().expect("packages");
        assert!(!packages.is_empty());
        for package in packages {
            let dir = format!(
                "{}@{}",
                package["package"].as_str().expect("package"),
                package["version"].as_str().expect("version")
            );
            for (file, digest) in package["files"].as_object().expect("files") {
                let path = format!("{ROOT}/vendor/{dir}/{file}");
                let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                let actual = format!("sha256-{}", hex::encode(Sha256::digest(&bytes)));
                assert_eq!(Some(actual.as_str()), digest.as_str(), "{path}");
            }
        }
        for asset in ASSETS.iter().filter(|a| a.path.starts_with("vendor/")) {
            let listed = packages.iter().any(|p| {
                let prefix = format!(
                    "vendor/{}@{}/",
                    p["package"].as_str().unwrap_or(""),
                    p["version"].as_str().unwrap_or("")
                );
                asset
                    .path
                    .strip_prefix(&prefix)
                    .is_some_and(|f| p["files"].get(f).is_some())
            });
            assert!(listed, "{} is not in MANIFEST.json", asset.path);
        }
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn types_and_caching() {
        assert_eq!(
            content_type("app/main.js"),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(
            content_type("vendor/preact@11.2.0/dist/preact.mjs"),
            "text/javascript; charset=utf-8"
        );
        assert!(cache_control("vendor/x@1/y.js").contains("immutable"));
        assert_eq!(cache_control("app/main.js"), "no-cache");
        assert!(DASHBOARD_CSP.contains("'sha256-"));
        assert!(
            !DASHBOARD_CSP.contains("'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='"),
            "the import map was found"
        );
    }
}
