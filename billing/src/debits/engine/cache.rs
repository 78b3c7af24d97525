//! A per-process cache of what every batch reads but rarely changes: the models'
//! prices, each workspace's account discount, and each workspace's auto-reload
//! settings and alert thresholds.
//!
//! # Why it is exact
//!
//! Every change to those rows moves `config_version.version` in the same transaction
//! (database triggers, migration step 13). A batch reads the version in the same
//! snapshot as everything else; the entries it may use are those stored at that very
//! version. If the version moved, the batch reads every row it needs (the entries are
//! useless), and the first batch to store at the new version drops the old entries:
//! a price change applies to the next batch in every process. An entry stored at an
//! older version than the cache's is not kept.
//!
//! The policy rows are also changed by batches themselves (an alert disarmed, a reload
//! started); those changes move the version too, so a cached threshold is never
//! trusted after its own batch committed. Before that commit, a pipelined batch may
//! read the old version and judge on the old row; the policies' UPDATEs are
//! conditional (armed, IDLE) and wait on the row, so nothing fires twice.
//!
//! Memberships and the request ids already used are not cached: the first is read
//! only for requests attributed to a user, the second changes with every debit.

#![deny(clippy::arithmetic_side_effects)]

use super::rules::State;
use crate::money::DiscountBps;
use entity::{alert_thresholds, auto_reload_settings, models};
use std::collections::HashMap;
use std::sync::Mutex;
use uuid::Uuid;

/// Entries kept per kind; a kind that is full is emptied (a refill costs one batch's
/// reads).
pub const ENTRIES_MAX: usize = 10_000;

/// A workspace's balance-change policy rows.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Policies {
    pub settings: Option<auto_reload_settings::Model>,
    /// Highest amount first.
    pub thresholds: Vec<alert_thresholds::Model>,
}

/// What a batch read (or may take from the cache), by the name it was asked by.
#[derive(Debug, Default)]
pub(crate) struct Entries {
    pub models: HashMap<String, models::Model>,
    /// Workspace id → its account's volume discount.
    pub discounts: HashMap<Uuid, DiscountBps>,
    /// Workspace id → its policy rows.
    pub policies: HashMap<Uuid, Policies>,
}

/// What the cache holds for a batch: `entries`, valid only if the batch reads
/// `version` (None: nothing cached yet).
#[derive(Debug, Default)]
pub(crate) struct Hits {
    pub version: Option<i64>,
    pub entries: Entries,
}

/// The process's cache (one per debit writer, shared by its lanes).
#[derive(Debug, Default)]
pub struct ConfigCache(Mutex<Cached>);

#[derive(Debug, Default)]
struct Cached {
    version: Option<i64>,
    entries: Entries,
}

impl ConfigCache {
    /// The entries for the models and workspaces a batch names.
    pub(crate) fn lookup<'a>(
        &self,
        models: impl Iterator<Item = &'a str>,
        workspaces: impl Iterator<Item = Uuid> + Clone,
    ) -> Hits {
        let Ok(cached) = self.0.lock() else {
            return Hits::default();
        };
        let mut hits = Hits {
            version: cached.version,
            entries: Entries::default(),
        };
        for id in models {
            if let Some(m) = cached.entries.models.get(id) {
                hits.entries.models.insert(id.to_owned(), m.clone());
            }
        }
        for id in workspaces.clone() {
            if let Some(d) = cached.entries.discounts.get(&id) {
                hits.entries.discounts.insert(id, *d);
            }
        }
        for id in workspaces {
            if let Some(p) = cached.entries.policies.get(&id) {
                hits.entries.policies.insert(id, p.clone());
            }
        }
        hits
    }

    /// Keeps what a batch read at `version`. A newer version drops every entry first;
    /// an older one keeps nothing.
    pub(crate) fn store(&self, version: i64, read: Entries) {
        let Ok(mut cached) = self.0.lock() else {
            return;
        };
        match cached.version {
            Some(v) if v > version => return,
            Some(v) if v == version => {}
            _ => {
                cached.version = Some(version);
                cached.entries = Entries::default();
            }
        }
        let e = &mut cached.entries;
        keep(&mut e.models, read.models);
        keep(&mut e.discounts, read.discounts);
        keep(&mut e.policies, read.policies);
    }

    /// The newest config version a batch of this process has read (None: none yet):
    /// a credential cached before it moved may have been revoked.
    pub fn version(&self) -> Option<i64> {
        self.0.lock().ok().and_then(|c| c.version)
    }
}

/// Completes a batch's state with the entries it may take (if it read the version
/// they were stored at) and stores what it read itself.
pub(crate) fn combine(cache: Option<&ConfigCache>, state: &mut State, hits: Hits, version: i64) {
    let Some(cache) = cache else {
        return;
    };
    let valid = hits.version == Some(version);
    let hit = if valid {
        hits.entries
    } else {
        Entries::default()
    };
    let mut fresh = Entries::default();
    for (id, model) in &state.models {
        if !hit.models.contains_key(id) {
            fresh.models.insert(id.clone(), model.clone());
        }
    }
    for ws in state.workspaces.values() {
        let (id, account_id) = (ws.row.id, ws.row.account_id);
        match hit.discounts.get(&id) {
            Some(d) => {
                state.discounts.entry(account_id).or_insert(*d);
            }
            None => {
                if let Some(d) = state.discounts.get(&account_id) {
                    fresh.discounts.insert(id, *d);
                }
            }
        }
        match hit.policies.get(&id) {
            Some(p) => {
                if let Some(s) = &p.settings {
                    state.reload_settings.insert(id, s.clone());
                }
                if !p.thresholds.is_empty() {
                    state.thresholds.insert(id, p.thresholds.clone());
                }
            }
            None => {
                let policies = Policies {
                    settings: state.reload_settings.get(&id).cloned(),
                    thresholds: state.thresholds.get(&id).cloned().unwrap_or_default(),
                };
                fresh.policies.insert(id, policies);
            }
        }
    }
    state.models.extend(hit.models);
    cache.store(version, fresh);
}

fn keep<K: std::hash::Hash + Eq, V>(into: &mut HashMap<K, V>, from: HashMap<K, V>) {
    if into.len().saturating_add(from.len()) > ENTRIES_MAX {
        into.clear();
    }
    into.extend(from);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discount(bps: i32) -> DiscountBps {
        DiscountBps::new(bps).unwrap_or_else(|e| panic!("{e}"))
    }

    fn read(workspace: Uuid, bps: i32) -> Entries {
        Entries {
            discounts: HashMap::from([(workspace, discount(bps))]),
            ..Entries::default()
        }
    }

    fn hit(cache: &ConfigCache, workspace: Uuid) -> (Option<i64>, Option<DiscountBps>) {
        let hits = cache.lookup(std::iter::empty(), std::iter::once(workspace));
        (
            hits.version,
            hits.entries.discounts.get(&workspace).copied(),
        )
    }

    #[test]
    fn entries_are_kept_per_version_and_dropped_when_it_moves() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let cache = ConfigCache::default();
        assert_eq!(hit(&cache, a), (None, None));
        cache.store(3, read(a, 100));
        cache.store(3, read(b, 200));
        assert_eq!(hit(&cache, a), (Some(3), Some(discount(100))));
        assert_eq!(hit(&cache, b), (Some(3), Some(discount(200))));
        // A batch of another lane read version 4: everything of version 3 goes.
        cache.store(4, read(b, 250));
        assert_eq!(hit(&cache, a), (Some(4), None));
        assert_eq!(hit(&cache, b), (Some(4), Some(discount(250))));
        // A batch that read the older version, finishing late, leaves nothing behind.
        cache.store(3, read(a, 100));
        assert_eq!(hit(&cache, a), (Some(4), None));
        assert_eq!(cache.version(), Some(4));
    }

    #[test]
    fn a_full_kind_is_emptied_before_it_grows_past_its_bound() {
        let cache = ConfigCache::default();
        for i in 0..=ENTRIES_MAX {
            let id = Uuid::from_u128(u128::try_from(i).unwrap_or(0));
            cache.store(1, read(id, 0));
        }
        let size = cache
            .0
            .lock()
            .map(|c| c.entries.discounts.len())
            .unwrap_or(0);
        assert!((1..=ENTRIES_MAX).contains(&size), "{size}");
    }
}
