//! A per-process cache of parsed GraphQL documents.
//!
//! The gateway sends the same few documents thousands of times a second (the
//! variables change, the text does not), and parsing was the largest single item of
//! the server's CPU per debit after allocation (docs/BENCHMARKS.md). A hit hands out a
//! clone of the parsed document; validation, the document limits and execution still
//! run for every request, so a cached document is refused or answered exactly as a
//! freshly parsed one. Only documents that parsed are kept.
//!
//! Registered as the innermost parse hook: the extensions around it (the document
//! limits, the request metrics) see every document, cached or not.

use async_graphql::extensions::{Extension, ExtensionContext, ExtensionFactory, NextParseQuery};
use async_graphql::parser::types::ExecutableDocument;
use async_graphql::{ServerResult, Variables};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Documents kept (the map is cleared when full: simple, and a refill costs one parse
/// per document).
pub const ENTRIES_MAX: usize = 512;
/// Longer documents are parsed every time (they are not the gateway's).
pub const QUERY_LEN_MAX: usize = 8 * 1024;

type Entries = Arc<Mutex<HashMap<String, ExecutableDocument>>>;

/// The extension factory; every schema built with it shares one cache.
#[derive(Clone, Default)]
pub struct DocumentCache(Entries);

impl ExtensionFactory for DocumentCache {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(DocumentCacheExtension(self.0.clone()))
    }
}

struct DocumentCacheExtension(Entries);

#[async_graphql::async_trait::async_trait]
impl Extension for DocumentCacheExtension {
    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        if query.len() > QUERY_LEN_MAX {
            return next.run(ctx, query, variables).await;
        }
        let hit = self.0.lock().ok().and_then(|m| m.get(query).cloned());
        if let Some(doc) = hit {
            return Ok(doc);
        }
        let doc = next.run(ctx, query, variables).await?;
        if let Ok(mut entries) = self.0.lock() {
            if entries.len() >= ENTRIES_MAX {
                entries.clear();
            }
            entries.insert(query.to_owned(), doc.clone());
        }
        Ok(doc)
    }
}
