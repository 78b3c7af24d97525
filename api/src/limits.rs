//! Limits on what one GraphQL document may ask for, checked right after parsing and
//! before validation or execution, so an abusive document costs one parse:
//! - depth, not counting introspection (`__schema`, `__type`): the standard full
//!   introspection query that GraphiQL and code generators send is about 13 deep, while
//!   no dashboard query needs more than [`QUERY_DEPTH_MAX`];
//! - aliases, which otherwise turn one small request into thousands of resolver runs;
//! - money-moving root fields per mutation: `recordUsageBatch` is the way to send many.
//!
//! async-graphql's own depth limit is set above the deepest introspection query, as a
//! backstop; the schema's complexity limit still applies to everything.

use async_graphql::parser::types::{
    ExecutableDocument, FragmentDefinition, OperationType, Selection, SelectionSet,
};
use async_graphql::parser::{Pos, Positioned};
use async_graphql::{Name, ServerError, ServerResult, Variables};
use std::collections::HashMap;

/// The deepest legitimate dashboard query (account → workspaces → projects → usage →
/// rows → project) is about 8 deep.
pub const QUERY_DEPTH_MAX: usize = 12;
/// async-graphql's own depth limit: above the full introspection query's depth.
pub const SCHEMA_DEPTH_MAX: usize = 24;
pub const ALIASES_MAX: usize = 64;
/// Root fields of one mutation that move money or place holds.
pub const MONEY_FIELDS_MAX: usize = 10;
/// Field selections visited per document (fragments expanded), a guard against
/// fragments that spread each other exponentially.
pub const SELECTIONS_MAX: usize = 10_000;
/// Directives on one field (`@include`/`@skip` floods).
pub const DIRECTIVES_PER_FIELD_MAX: usize = 4;

/// Mutations that move credits or hold them.
const MONEY_FIELDS: &[&str] = &[
    "purchaseCredits",
    "recordUsage",
    "recordUsageBatch",
    "reserveCredits",
    "settleReservation",
    "releaseReservation",
    "transferCredits",
    "markInvoicePaid",
];

/// What a document asks for, counted once.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DocumentShape {
    pub depth: usize,
    pub aliases: usize,
    /// The most money-moving root fields of any one mutation operation.
    pub money_fields: usize,
    pub selections: usize,
    /// `__schema` and `__type` fields.
    pub introspection: usize,
}

type Fragments = HashMap<Name, Positioned<FragmentDefinition>>;

/// Walks a selection set at `depth` (the depth of the fields it holds).
fn walk<'a>(
    set: &'a SelectionSet,
    fragments: &'a Fragments,
    depth: usize,
    shape: &mut DocumentShape,
    spreading: &mut Vec<&'a str>,
) {
    for item in &set.items {
        if shape.selections > SELECTIONS_MAX {
            return;
        }
        match &item.node {
            Selection::Field(field) => {
                let field = &field.node;
                shape.selections = shape.selections.saturating_add(1);
                if field.alias.is_some() {
                    shape.aliases = shape.aliases.saturating_add(1);
                }
                let name = field.name.node.as_str();
                if name == "__schema" || name == "__type" {
                    shape.introspection = shape.introspection.saturating_add(1);
                    continue; // introspection has its own shape; see the module doc
                }
                shape.depth = shape.depth.max(depth);
                let below = depth.saturating_add(1);
                walk(
                    &field.selection_set.node,
                    fragments,
                    below,
                    shape,
                    spreading,
                );
            }
            Selection::InlineFragment(inline) => {
                walk(
                    &inline.node.selection_set.node,
                    fragments,
                    depth,
                    shape,
                    spreading,
                );
            }
            Selection::FragmentSpread(spread) => {
                let name = spread.node.fragment_name.node.as_str();
                // A cycle is the validator's to report; here it only must not loop.
                let Some(fragment) = fragments.get(name).filter(|_| !spreading.contains(&name))
                else {
                    continue;
                };
                spreading.push(name);
                walk(
                    &fragment.node.selection_set.node,
                    fragments,
                    depth,
                    shape,
                    spreading,
                );
                spreading.pop();
            }
        }
    }
}

/// The root field names of a selection set, through fragments and inline fragments.
fn root_fields<'a>(
    set: &'a SelectionSet,
    fragments: &'a Fragments,
    out: &mut Vec<&'a str>,
    spreading: &mut Vec<&'a str>,
) {
    for item in &set.items {
        match &item.node {
            Selection::Field(field) => out.push(field.node.name.node.as_str()),
            Selection::InlineFragment(inline) => {
                root_fields(&inline.node.selection_set.node, fragments, out, spreading);
            }
            Selection::FragmentSpread(spread) => {
                let name = spread.node.fragment_name.node.as_str();
                let fragment = fragments.get(name).filter(|_| !spreading.contains(&name));
                if let Some(fragment) = fragment
                    && out.len() <= SELECTIONS_MAX
                {
                    spreading.push(name);
                    root_fields(&fragment.node.selection_set.node, fragments, out, spreading);
                    spreading.pop();
                }
            }
        }
    }
}

pub fn shape_of(doc: &ExecutableDocument) -> DocumentShape {
    let mut shape = DocumentShape::default();
    for (_, operation) in doc.operations.iter() {
        let set = &operation.node.selection_set.node;
        walk(set, &doc.fragments, 1, &mut shape, &mut Vec::new());
        if operation.node.ty == OperationType::Mutation {
            let mut roots = Vec::new();
            root_fields(set, &doc.fragments, &mut roots, &mut Vec::new());
            let money = roots.iter().filter(|f| MONEY_FIELDS.contains(f)).count();
            shape.money_fields = shape.money_fields.max(money);
        }
    }
    shape
}

/// The shape of a document given as text (None when it does not parse).
pub fn shape_of_query(query: &str) -> Option<DocumentShape> {
    async_graphql::parser::parse_query(query)
        .ok()
        .map(|doc| shape_of(&doc))
}

/// The refusal for a document over a limit, or None.
pub fn check(shape: &DocumentShape) -> Option<String> {
    if shape.selections > SELECTIONS_MAX {
        return Some(format!(
            "the document selects more than {SELECTIONS_MAX} fields"
        ));
    }
    if shape.depth > QUERY_DEPTH_MAX {
        return Some(format!(
            "Query is nested too deep: {} levels, at most {QUERY_DEPTH_MAX}",
            shape.depth
        ));
    }
    if shape.aliases > ALIASES_MAX {
        return Some(format!(
            "the document has {} aliases, at most {ALIASES_MAX}",
            shape.aliases
        ));
    }
    if shape.money_fields > MONEY_FIELDS_MAX {
        return Some(format!(
            "a mutation may move money in at most {MONEY_FIELDS_MAX} fields ({} here); \
             send usage in bulk with recordUsageBatch",
            shape.money_fields
        ));
    }
    None
}

/// The extension that applies [`check`] to every parsed document.
pub struct DocumentLimits;

impl async_graphql::extensions::ExtensionFactory for DocumentLimits {
    fn create(&self) -> std::sync::Arc<dyn async_graphql::extensions::Extension> {
        std::sync::Arc::new(DocumentLimitsExtension)
    }
}

struct DocumentLimitsExtension;

fn limit_error(why: String, code: billing::ErrorCode) -> ServerError {
    let mut error = ServerError::new(why, Some(Pos::default()));
    error.locations.clear();
    error
        .extensions
        .get_or_insert_with(Default::default)
        .set("code", code.as_str());
    error
}

/// Schema data that switches introspection off: a document that asks for the schema
/// is then refused with a word (FORBIDDEN), rather than answered with a silent null.
pub struct IntrospectionOff;

#[async_graphql::async_trait::async_trait]
impl async_graphql::extensions::Extension for DocumentLimitsExtension {
    async fn parse_query(
        &self,
        ctx: &async_graphql::extensions::ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: async_graphql::extensions::NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let doc = next.run(ctx, query, variables).await?;
        let shape = shape_of(&doc);
        if shape.introspection > 0 && ctx.data_opt::<IntrospectionOff>().is_some() {
            return Err(limit_error(
                "introspection is turned off on this server".into(),
                billing::ErrorCode::Forbidden,
            ));
        }
        match check(&shape) {
            None => Ok(doc),
            Some(why) => Err(limit_error(why, billing::ErrorCode::LimitExceeded)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(query: &str) -> DocumentShape {
        shape_of(&async_graphql::parser::parse_query(query).expect("parses"))
    }

    #[test]
    fn introspection_does_not_count_towards_depth() {
        let deep = "{ __schema { types { fields { type { ofType { ofType { ofType { ofType \
                    { ofType { ofType { ofType { name } } } } } } } } } } } }";
        assert_eq!(check(&shape(deep)), None);
        assert_eq!(shape("{ a { b { c } } }").depth, 3);
    }

    #[test]
    fn aliases_fragments_and_money_fields_are_counted() {
        let aliased: String = (0..65).map(|i| format!("a{i}: viewer {{ id }} ")).collect();
        assert!(check(&shape(&format!("{{ {aliased} }}"))).is_some());
        let money: String = (0..11)
            .map(|i| format!("u{i}: recordUsage(input: {{}}) {{ id }} "))
            .collect();
        let s = shape(&format!("mutation {{ {money} }}"));
        assert_eq!(s.money_fields, 11);
        assert!(check(&s).is_some_and(|why| why.contains("recordUsageBatch")));
        let spread = "mutation { ...F } fragment F on MutationRoot { a: recordUsage { id } \
                      b: recordUsage { id } }";
        assert_eq!(shape(spread).money_fields, 2);
    }

    #[test]
    fn cyclic_and_exponential_fragments_terminate() {
        let cyclic = "{ ...A } fragment A on Q { x ...B } fragment B on Q { y ...A }";
        assert!(shape(cyclic).selections < 10);
        let self_spread = "mutation { ...A } fragment A on M { ...A }";
        assert_eq!(shape(self_spread).money_fields, 0);
        let mut doc = String::from("{ ...F0 } ");
        for i in 0..30 {
            doc.push_str(&format!(
                "fragment F{i} on Q {{ a ...F{n} b: a ...F{n} }} ",
                n = i + 1
            ));
        }
        doc.push_str("fragment F30 on Q { z }");
        assert!(check(&shape(&doc)).is_some());
    }
}
