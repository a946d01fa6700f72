//! The queue status file: how `edgehub queue stats` sees a running hub.
//!
//! fjall locks the database, so a second process cannot open it while the
//! hub runs. The hub therefore writes its queue stats to
//! `<storage>/queue-stats.json` when they change (checked once a second),
//! with [`crate::durable_file`], so readers never see half a file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::QueueStats;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub depth: u64,
    pub bytes: u64,
    pub oldest_ms: Option<u64>,
    /// When the hub wrote this file.
    pub written_ms: u64,
}

pub fn path(storage: &Path) -> PathBuf {
    storage.join("queue-stats.json")
}

pub fn write(storage: &Path, stats: QueueStats) -> std::io::Result<()> {
    let status = Status {
        depth: stats.depth,
        bytes: stats.bytes,
        oldest_ms: stats.oldest_ms,
        written_ms: crate::clock::wall_ms(),
    };
    crate::durable_file::replace(
        &path(storage),
        &serde_json::to_vec(&status).expect("status serializes"),
    )
}

pub fn read(storage: &Path) -> std::io::Result<Status> {
    let text = std::fs::read(path(storage))?;
    serde_json::from_slice(&text)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
