//! The dashboard's and GraphiQL's files over HTTP (no browser needed): content types,
//! caching headers, ETag revalidation, and every script and stylesheet the pages name is
//! served from the binary (nothing from another host).

use reservoir_tests::TestDb;
use reservoir_tests::app::App;

async fn get(app: &App, path: &str) -> anyhow::Result<reqwest::Response> {
    Ok(app.client.get(format!("{}{path}", app.base)).send().await?)
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// The `src="…"` and `href="…"` of a page.
fn references(page: &str) -> Vec<String> {
    let mut found = Vec::new();
    for attribute in ["src=\"", "href=\""] {
        for (i, _) in page.match_indices(attribute) {
            let rest = &page[i + attribute.len()..];
            if let Some(end) = rest.find('"') {
                found.push(rest[..end].to_owned());
            }
        }
    }
    found
}

/// A page is HTML, revalidated, and every script and stylesheet it names is served here.
async fn check_page(app: &App, page: &str, marker: &str) -> anyhow::Result<()> {
    let response = get(app, page).await?;
    assert_eq!(response.status(), 200, "{page}");
    assert_eq!(
        header(&response, "content-type"),
        "text/html; charset=utf-8"
    );
    assert_eq!(header(&response, "cache-control"), "no-cache");
    let body = response.text().await?;
    assert!(body.contains(marker), "{page}");
    let refs = references(&body);
    assert!(refs.len() >= 3, "{page}: {refs:?}");
    for reference in refs.into_iter().filter(|r| !r.starts_with("data:")) {
        assert!(
            reference.starts_with("/dashboard/assets/"),
            "{page} loads {reference}"
        );
        let asset = get(app, &reference).await?;
        assert_eq!(asset.status(), 200, "{reference}");
        let kind = header(&asset, "content-type");
        assert!(
            kind.starts_with("text/javascript") || kind.starts_with("text/css"),
            "{reference}: {kind}"
        );
    }
    Ok(())
}

/// Versioned vendor files are immutable; the app's own files revalidate with an ETag.
async fn check_caching(app: &App) -> anyhow::Result<()> {
    let vendored = get(
        app,
        "/dashboard/assets/vendor/preact@11.2.0/dist/preact.mjs",
    )
    .await?;
    assert_eq!(
        header(&vendored, "cache-control"),
        "public, max-age=31536000, immutable"
    );
    assert_eq!(
        header(&vendored, "content-type"),
        "text/javascript; charset=utf-8"
    );
    assert_eq!(header(&vendored, "x-content-type-options"), "nosniff");
    let own = get(app, "/dashboard/assets/app/main.js").await?;
    assert_eq!(header(&own, "cache-control"), "no-cache");
    let etag = header(&own, "etag");
    assert!(etag.starts_with('"') && etag.len() > 10, "etag {etag}");
    let again = app
        .client
        .get(format!("{}/dashboard/assets/app/main.js", app.base))
        .header("if-none-match", &etag)
        .send()
        .await?;
    assert_eq!(again.status(), 304);
    assert!(again.text().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn pages_and_assets_come_from_the_binary() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let app = App::start(&t).await?;
    check_page(&app, "/dashboard", "importmap").await?;
    check_page(&app, "/", "graphiql.min.js").await?;
    let head = app
        .client
        .head(format!("{}/dashboard", app.base))
        .send()
        .await?;
    assert_eq!(head.status(), 200);
    assert_eq!(header(&head, "content-type"), "text/html; charset=utf-8");
    let csp = header(&get(&app, "/dashboard").await?, "content-security-policy");
    assert!(
        csp.contains("default-src 'self'") && csp.contains("'sha256-"),
        "{csp}"
    );
    check_caching(&app).await?;
    for missing in [
        "/dashboard/assets/nope.js",
        "/dashboard/assets/../Cargo.toml",
        "/dashboard/assets/vendor/MANIFEST.json",
    ] {
        assert_eq!(get(&app, missing).await?.status(), 404, "{missing}");
    }
    app.stop().await;
    t.finish().await
}
