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

#[cfg(test)]
mod tests {
    use super::*;
    use async_graphql::{EmptyMutation, EmptySubscription, Object, Schema};

    struct Query;

    #[Object]
    impl Query {
        async fn answer(&self, x: i32) -> i32 {
            x + 1
        }
    }

    fn schema(cache: DocumentCache) -> Schema<Query, EmptyMutation, EmptySubscription> {
        Schema::build(Query, EmptyMutation, EmptySubscription)
            .limit_depth(2)
            .extension(cache)
            .finish()
    }

    #[tokio::test]
    async fn a_cached_document_is_validated_and_answered_as_a_fresh_one() {
        let cache = DocumentCache::default();
        let schema = schema(cache.clone());
        let query = "query($x: Int!) { answer(x: $x) }";
        for x in [1, 41] {
            let request = async_graphql::Request::new(query)
                .variables(Variables::from_json(serde_json::json!({ "x": x })));
            let response = schema.execute(request).await;
            assert!(response.errors.is_empty(), "{:?}", response.errors);
            assert_eq!(
                response.data.into_json().ok(),
                Some(serde_json::json!({"answer": x + 1}))
            );
        }
        assert_eq!(cache.0.lock().map(|m| m.len()).ok(), Some(1));
        // Validation still runs on a hit: an unknown field is refused every time.
        for _ in 0..2 {
            let response = schema.execute("{ answer(x: 1) nope }").await;
            assert_eq!(response.errors.len(), 1, "{:?}", response.errors);
        }
        // A document that does not parse is not kept.
        let response = schema.execute("{ answer(x: ").await;
        assert!(!response.errors.is_empty());
        assert_eq!(cache.0.lock().map(|m| m.len()).ok(), Some(2));
    }
}
