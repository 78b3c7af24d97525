//! Read-only views: usage analytics over the rollups (`analytics`) and cursor-paged
//! history (`history`).

pub mod analytics;
pub mod history;
