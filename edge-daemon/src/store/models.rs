//! The model store: bundles installed on this device, and which one runs.
//!
//! The bundles are files beside the database, `DIR/deployed/VERSION.bundle`, as uploaded (a
//! bundle is megabytes; kept in sled it would sit in its page cache and log, as captures did).
//! The folder is the daemon's alone: [`Models::open`] removes what it does not know there. It
//! is not `DIR/models/`, where the board's guide puts the configured bundle by hand.
//! sled holds one record per installed bundle in the `models` tree (key: the version, UTF-8;
//! value: [`InstalledModel`] as JSON) and the activation state under the key
//! `weld-edge.active-model` of the default tree ([`Activation`] as JSON).
//!
//! Crash rules (a model change interrupted at any moment leaves a valid model on restart):
//! - A bundle's file is complete before its record exists: it is uploaded to a temporary name
//!   (`.upload-*`), checked, renamed to its final name and the directory synced; then the record
//!   is written and flushed. [`Models::open`] removes temporary files, files without a record
//!   and records without a file.
//! - The activation state is one sled value, replaced whole and flushed after the new model
//!   runs; on restart the daemon loads the active version and checks it again (signature,
//!   hashes, golden outputs), falling back along [`Activation::previous`] and finally to the
//!   configured model if it does not pass.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{StoreError, sled_err};

/// Tree name of the installed bundles' records.
pub const MODELS_TREE: &str = "models";
/// Folder of the installed bundle files inside the data directory (not `models`: people keep
/// their configured bundles there, and this folder's unknown files are removed).
pub const MODELS_DIR: &str = "deployed";
/// Key in the default tree that holds the [`Activation`].
const ACTIVE_KEY: &[u8] = b"weld-edge.active-model";
/// Prefix of an upload's temporary file in [`MODELS_DIR`].
const UPLOAD_PREFIX: &str = ".upload-";
/// Most entries [`Activation::previous`] keeps (rollback depth).
const MAX_PREVIOUS: usize = 16;

/// What the device knows about one installed bundle (from its verified manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstalledModel {
    /// The manifest's version; also the file name and the API's `{version}`.
    pub version: String,
    /// The manifest's name.
    pub name: String,
    /// sha256 of the whole bundle file, hex.
    pub sha256: String,
    /// Size of the bundle file in bytes.
    pub bytes: u64,
    /// Id of the key that signed it (`weld_core::bundle::key_id`).
    pub signer: String,
    /// `f32` or `int8`.
    pub quantization: String,
    /// The classes, in logit order.
    pub classes: Vec<String>,
    /// When this device installed it.
    pub installed: DateTime<Utc>,
}

/// Which model runs: an installed version, or (`None`) the model of the config file. The
/// versions that ran before it, newest first, are where `rollback` goes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Activation {
    /// The running installed version; `None`: the configured model.
    pub active: Option<String>,
    /// What ran before, newest first (`None`: the configured model), at most 16.
    pub previous: Vec<Option<String>>,
}

impl Activation {
    /// The state after `next` becomes active.
    pub fn then(&self, next: Option<String>) -> Activation {
        let mut previous = vec![self.active.clone()];
        previous.extend(self.previous.iter().cloned());
        previous.dedup();
        previous.retain(|p| *p != next);
        previous.truncate(MAX_PREVIOUS);
        Activation {
            active: next,
            previous,
        }
    }
}

/// Handle to the model store. Clones share the tree.
#[derive(Debug, Clone)]
pub struct Models {
    db: sled::Db,
    tree: sled::Tree,
    dir: PathBuf,
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::ModelFile {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether `version` can name a bundle on this device: 1 to 64 of `A-Z a-z 0-9 . _ -`, not
/// starting with a dot (it becomes a file name and a URL path segment). `Err` says why not.
pub fn check_version(version: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if version.is_empty() || version.len() > 64 {
        return Err(format!(
            "version {version:?} must be 1 to 64 characters long"
        ));
    }
    if version.starts_with('.') || !version.chars().all(allowed) {
        return Err(format!(
            "version {version:?} may hold only letters, digits, '.', '_' and '-', and may not \
             start with '.'"
        ));
    }
    Ok(())
}

impl Models {
    /// Opens the store's model part: creates `dir`, removes what an interrupted install left
    /// (temporary uploads, files without a record, records without a file).
    pub(super) fn open(db: &sled::Db, tree: sled::Tree, dir: &Path) -> Result<Models, StoreError> {
        std::fs::create_dir_all(dir).map_err(file_err(dir))?;
        let models = Models {
            db: db.clone(),
            tree,
            dir: dir.to_path_buf(),
        };
        let mut known = HashSet::new();
        for item in models.tree.iter() {
            let (k, _) = item.map_err(sled_err("models count on open"))?;
            let version = String::from_utf8_lossy(&k).into_owned();
            if models.path(&version).is_file() {
                known.insert(format!("{version}.bundle"));
            } else {
                tracing::warn!(%version, "removing the record of an installed model whose file is gone");
                models.tree.remove(&k).map_err(sled_err("models cleanup"))?;
            }
        }
        for entry in std::fs::read_dir(dir).map_err(file_err(dir))? {
            let path = entry.map_err(file_err(dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let leftover = name.starts_with(UPLOAD_PREFIX)
                || (name.ends_with(".bundle") && !known.contains(name));
            if leftover {
                tracing::info!(file = %path.display(), "removing a model file left by an interrupted install");
                std::fs::remove_file(&path).map_err(file_err(&path))?;
            }
        }
        Ok(models)
    }

    /// Where the bundle of `version` lives.
    pub fn path(&self, version: &str) -> PathBuf {
        self.dir.join(format!("{version}.bundle"))
    }

    /// A new temporary file name for an upload, in the models folder (so that the rename that
    /// installs it stays on one file system).
    pub fn upload_path(&self) -> PathBuf {
        self.dir
            .join(format!("{UPLOAD_PREFIX}{}", uuid::Uuid::new_v4().simple()))
    }

    /// Every installed bundle, oldest install first.
    pub fn list(&self) -> Result<Vec<InstalledModel>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item.map_err(sled_err("models read"))?;
            match serde_json::from_slice::<InstalledModel>(&v) {
                Ok(m) => out.push(m),
                Err(e) => tracing::warn!(
                    version = %String::from_utf8_lossy(&k),
                    error = %e,
                    "skipping an installed model's record that does not decode"
                ),
            }
        }
        out.sort_by_key(|m| m.installed);
        Ok(out)
    }

    /// The record of `version`, if installed.
    pub fn get(&self, version: &str) -> Result<Option<InstalledModel>, StoreError> {
        let Some(v) = self
            .tree
            .get(version.as_bytes())
            .map_err(sled_err("models read"))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                tree: MODELS_TREE,
                key: version.to_string(),
                reason: e.to_string(),
            })
    }

    /// Moves a checked upload to its final name and records it, durably: the file is in place
    /// and synced before the record is written, and the record is flushed before this returns.
    pub fn install(&self, upload: &Path, record: &InstalledModel) -> Result<(), StoreError> {
        let dest = self.path(&record.version);
        std::fs::rename(upload, &dest).map_err(file_err(&dest))?;
        // The rename is durable once the folder's entry is on disk.
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(file_err(&self.dir))?;
        let value = serde_json::to_vec(record).map_err(|e| StoreError::Corrupt {
            tree: MODELS_TREE,
            key: record.version.clone(),
            reason: e.to_string(),
        })?;
        self.tree
            .insert(record.version.as_bytes(), value)
            .map_err(sled_err("models insert"))?;
        self.flush()
    }

    /// Removes an installed bundle: its record first, then its file (a crash in between leaves
    /// a file without a record, which [`Models::open`] removes).
    pub fn remove(&self, version: &str) -> Result<bool, StoreError> {
        let existed = self
            .tree
            .remove(version.as_bytes())
            .map_err(sled_err("models remove"))?
            .is_some();
        self.flush()?;
        let path = self.path(version);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(file_err(&path)(e)),
            _ => Ok(existed),
        }
    }

    /// The activation state (the default, the configured model, when none was ever stored or
    /// the stored one does not decode).
    pub fn activation(&self) -> Result<Activation, StoreError> {
        let Some(v) = self.db.get(ACTIVE_KEY).map_err(sled_err("models read"))? else {
            return Ok(Activation::default());
        };
        Ok(serde_json::from_slice(&v).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the stored active model does not decode; running the configured model");
            Activation::default()
        }))
    }

    /// Replaces the activation state, flushed before this returns.
    pub fn set_activation(&self, activation: &Activation) -> Result<(), StoreError> {
        let value = serde_json::to_vec(activation).map_err(|e| StoreError::Corrupt {
            tree: "default",
            key: String::from_utf8_lossy(ACTIVE_KEY).into_owned(),
            reason: e.to_string(),
        })?;
        self.db
            .insert(ACTIVE_KEY, value)
            .map_err(sled_err("models activate"))?;
        self.flush()
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(sled_err("models flush"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_keeps_what_ran_before_newest_first_without_repeats() {
        let a = Activation::default().then(Some("v1".into()));
        assert_eq!(a.active.as_deref(), Some("v1"));
        assert_eq!(a.previous, vec![None]);
        let b = a.then(Some("v2".into())).then(Some("v1".into()));
        assert_eq!(b.active.as_deref(), Some("v1"));
        assert_eq!(b.previous, vec![Some("v2".to_string()), None]);
        let mut c = b;
        for i in 0..40 {
            c = c.then(Some(format!("x{i}")));
        }
        assert_eq!(c.previous.len(), MAX_PREVIOUS);
        assert_eq!(c.previous[0].as_deref(), Some("x38"));
    }

    #[test]
    fn versions_that_are_not_safe_file_names_are_refused() {
        for ok in ["v1", "synthetic-2026.12.07", "A_b-9"] {
            assert!(check_version(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "../up", "a/b", "sp ace", &"x".repeat(65)] {
            let why = check_version(bad).unwrap_err();
            assert!(why.contains("version"), "{why}");
        }
    }
}
