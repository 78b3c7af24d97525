//! Policies run inside balance changes: auto-reload (`auto_reload`, its outcome
//! bookkeeping in `reload_state`), low-balance alerts (`alerts`), and what to tell
//! whom (`notifications`).

pub mod alert_thresholds;
pub mod alerts;
pub mod auto_reload;
pub mod auto_reload_settings;
pub mod notifications;
pub mod reload_state;
