//! Debits: everything that draws on a workspace's pool per model call. Usage
//! (`usage`), holds and their settlement (`reservations`), project budgets
//! (`budget`), and the group-commit writer that runs them in batches (`writer`).

pub mod budget;
pub mod reservations;
pub mod usage;
pub mod writer;
