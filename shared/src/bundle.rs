//! Model bundles (DESIGN.md "Model bundle"): one uncompressed tar holding `manifest.json`,
//! `model.onnx`, `manifest.sig` (an ed25519 signature of the manifest's exact bytes) and,
//! when the manifest has a `golden` check, `golden.bin` (its inputs). The manifest carries the
//! sha256 of the ONNX file and of `golden.bin`, so the signature covers them too.
//!
//! What this module checks is what needs no inference runtime: the tar's layout and sizes,
//! the manifest, the signature against trusted keys and the ONNX hash. Whether the model
//! loads and its input and outputs fit the manifest is checked by whoever runs it.

use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};

/// The public key type trusted keys are read into ([`read_verifying_key`]).
pub use ed25519_dalek::VerifyingKey;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::manifest::{ManifestError, ModelManifest};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const MODEL_FILE: &str = "model.onnx";
pub const SIGNATURE_FILE: &str = "manifest.sig";
pub const GOLDEN_FILE: &str = "golden.bin";

/// Largest manifest accepted: manifests are a few kB; this bounds memory on hostile input.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Largest ONNX file accepted (a ResNet50 in f32 is ~100 MB).
pub const MAX_MODEL_BYTES: u64 = 1 << 30;
/// Largest `golden.bin` accepted (a few preprocessed 224x224 inputs are ~0.6 MB each).
pub const MAX_GOLDEN_BYTES: u64 = 64 << 20;

#[derive(Debug, Error)]
pub enum BundleError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "not a model bundle (an uncompressed tar of {MANIFEST_FILE}, {MODEL_FILE} and \
         {SIGNATURE_FILE}): {0}"
    )]
    NotABundle(String),
    #[error("the bundle has no {0}")]
    Missing(&'static str),
    #[error("the bundle holds {0} twice")]
    Duplicate(String),
    #[error(
        "the bundle holds {0:?}, which is not part of a bundle ({MANIFEST_FILE}, {MODEL_FILE}, \
         {SIGNATURE_FILE}, {GOLDEN_FILE})"
    )]
    Unexpected(String),
    #[error("{GOLDEN_FILE}: {0}")]
    Golden(String),
    #[error("{name} is {size} bytes, over the limit of {limit}")]
    TooLarge { name: String, size: u64, limit: u64 },
    #[error("{SIGNATURE_FILE} is {0} bytes; an ed25519 signature is 64")]
    SignatureSize(usize),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("no trusted keys: a bundle can only be verified against at least one public key")]
    NoTrustedKeys,
    #[error(
        "{SIGNATURE_FILE} does not verify with any trusted key (trusted: {trusted}): the bundle \
         was signed by another key, or its manifest was changed after signing"
    )]
    Untrusted { trusted: String },
    #[error(
        "{MODEL_FILE} does not match the manifest: its sha256 is {actual}, the manifest says \
         {expected} (the ONNX was changed or swapped after signing)"
    )]
    OnnxMismatch { expected: String, actual: String },
    #[error("key {}: {detail}", path.display())]
    Key { path: PathBuf, detail: String },
}

/// A bundle as read: the manifest parsed and validated, nothing verified yet.
#[derive(Clone)]
pub struct Bundle {
    pub manifest: ModelManifest,
    /// The exact bytes that were signed.
    pub manifest_bytes: Vec<u8>,
    pub onnx: Vec<u8>,
    pub signature: [u8; 64],
    /// `golden.bin`, present exactly when the manifest has a `golden` check.
    pub golden: Option<Vec<u8>>,
}

impl fmt::Debug for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bundle")
            .field("name", &self.manifest.name)
            .field("version", &self.manifest.version)
            .field("onnx_bytes", &self.onnx.len())
            .field("golden_bytes", &self.golden.as_ref().map(Vec::len))
            .finish()
    }
}

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Hex sha256 of the file at `path`, read in chunks (a bundle can be 100 MB; a board should not
/// hold it twice to hash it).
pub fn sha256_file_hex(path: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// The short form of a public key shown in messages and listings: its first 8 bytes in hex.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&key.as_bytes()[..8])
}

impl Bundle {
    /// Signs `manifest` (its `onnx_sha256` set from `onnx`) with `key`. `golden` is the
    /// `golden.bin` of the manifest's golden check (its sha256 is set from it); both or
    /// neither.
    pub fn sign(
        mut manifest: ModelManifest,
        onnx: Vec<u8>,
        golden: Option<Vec<u8>>,
        key: &SigningKey,
    ) -> Result<Bundle, BundleError> {
        manifest.onnx_sha256 = sha256_hex(&onnx);
        match (&mut manifest.golden, &golden) {
            (Some(g), Some(bytes)) => g.sha256 = sha256_hex(bytes),
            (None, None) => {}
            _ => {
                return Err(BundleError::Golden(
                    "the manifest's golden check and the golden inputs come together".into(),
                ));
            }
        }
        let problems = manifest.problems();
        if !problems.is_empty() {
            return Err(ManifestError::Invalid(problems).into());
        }
        let mut manifest_bytes =
            serde_json::to_vec_pretty(&manifest).map_err(ManifestError::Parse)?;
        manifest_bytes.push(b'\n');
        let signature = key.sign(&manifest_bytes).to_bytes();
        let bundle = Bundle {
            manifest,
            manifest_bytes,
            onnx,
            signature,
            golden,
        };
        bundle.check_golden()?;
        Ok(bundle)
    }

    /// The golden inputs as `count` NCHW tensors, when the manifest has a golden check.
    pub fn golden_inputs(&self) -> Option<ndarray::Array4<f32>> {
        let (g, bytes) = (self.manifest.golden.as_ref()?, self.golden.as_ref()?);
        let [w, h] = self.manifest.input.size;
        let shape = (
            g.count,
            self.manifest.input.channels.len(),
            h as usize,
            w as usize,
        );
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        ndarray::Array4::from_shape_vec(shape, values).ok()
    }

    /// `golden.bin` encoded from `inputs` (NCHW, one tensor per golden input).
    pub fn golden_bytes(inputs: &ndarray::Array4<f32>) -> Vec<u8> {
        inputs.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// `golden.bin` is there exactly when the manifest asks for it, with its size.
    fn check_golden(&self) -> Result<(), BundleError> {
        match (&self.manifest.golden, &self.golden) {
            (None, None) => Ok(()),
            (Some(_), None) => Err(BundleError::Missing(GOLDEN_FILE)),
            (None, Some(_)) => Err(BundleError::Golden(
                "present, but the manifest has no golden check".into(),
            )),
            (Some(g), Some(bytes)) => {
                let want = g.expected_bytes(&self.manifest.input);
                if bytes.len() as u64 == want {
                    Ok(())
                } else {
                    Err(BundleError::Golden(format!(
                        "{} bytes, but {} inputs of the manifest's input need {want}",
                        bytes.len(),
                        g.count
                    )))
                }
            }
        }
    }

    /// The bundle as an uncompressed tar (manifest first, so a reader can stop early).
    pub fn to_tar(&self) -> io::Result<Vec<u8>> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut parts: Vec<(&str, &[u8])> = vec![
            (MANIFEST_FILE, &self.manifest_bytes),
            (MODEL_FILE, &self.onnx),
            (SIGNATURE_FILE, &self.signature),
        ];
        if let Some(g) = &self.golden {
            parts.push((GOLDEN_FILE, g));
        }
        for (name, bytes) in parts {
            let mut header = tar::Header::new_ustar();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(self.manifest.created.timestamp().max(0) as u64);
            header.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut header, name, bytes)?;
        }
        builder.into_inner()
    }

    /// Reads a bundle file.
    pub fn read(path: &Path) -> Result<Bundle, BundleError> {
        let file = std::fs::File::open(path).map_err(|source| BundleError::Io {
            path: path.to_owned(),
            source,
        })?;
        Bundle::from_reader(io::BufReader::new(file))
    }

    /// Parses a bundle from tar bytes: exactly the three files (four with a golden check),
    /// regular, each once, within the size limits, and a valid manifest.
    pub fn from_reader(reader: impl Read) -> Result<Bundle, BundleError> {
        let bad = |e: io::Error| BundleError::NotABundle(e.to_string());
        let mut archive = tar::Archive::new(reader);
        let (mut manifest, mut onnx, mut sig, mut golden) = (None, None, None, None);
        for entry in archive.entries().map_err(bad)? {
            let mut entry = entry.map_err(bad)?;
            let name = entry.path().map_err(bad)?.to_string_lossy().into_owned();
            let name = name.trim_start_matches("./").to_string();
            let kind = entry.header().entry_type();
            if kind.is_dir() && name.trim_end_matches('/').is_empty() {
                continue; // the "./" entry some tar tools write
            }
            let (slot, limit) = match name.as_str() {
                MANIFEST_FILE => (&mut manifest, MAX_MANIFEST_BYTES),
                MODEL_FILE => (&mut onnx, MAX_MODEL_BYTES),
                SIGNATURE_FILE => (&mut sig, 64),
                GOLDEN_FILE => (&mut golden, MAX_GOLDEN_BYTES),
                _ => return Err(BundleError::Unexpected(name)),
            };
            if !kind.is_file() {
                return Err(BundleError::NotABundle(format!(
                    "{name} is not a regular file"
                )));
            }
            if slot.is_some() {
                return Err(BundleError::Duplicate(name));
            }
            let size = entry.size();
            if size > limit {
                return Err(BundleError::TooLarge { name, size, limit });
            }
            // The header's size is only a claim until the bytes arrive: reserve a bounded
            // amount, so a cut-short or hostile bundle costs what it holds, not what it says.
            let mut bytes = Vec::with_capacity(size.min(16 << 20) as usize);
            entry.read_to_end(&mut bytes).map_err(bad)?;
            if bytes.len() as u64 != size {
                return Err(BundleError::NotABundle(format!(
                    "{name} is cut short: {} of {size} bytes",
                    bytes.len()
                )));
            }
            *slot = Some(bytes);
        }
        let manifest_bytes = manifest.ok_or(BundleError::Missing(MANIFEST_FILE))?;
        let onnx = onnx.ok_or(BundleError::Missing(MODEL_FILE))?;
        let sig = sig.ok_or(BundleError::Missing(SIGNATURE_FILE))?;
        let signature: [u8; 64] = sig
            .as_slice()
            .try_into()
            .map_err(|_| BundleError::SignatureSize(sig.len()))?;
        let manifest = ModelManifest::from_json(&manifest_bytes)?;
        let bundle = Bundle {
            manifest,
            manifest_bytes,
            onnx,
            signature,
            golden,
        };
        bundle.check_golden()?;
        Ok(bundle)
    }

    /// Checks the signature against `trusted` and the ONNX against the manifest's sha256;
    /// returns the key that signed it.
    pub fn verify(&self, trusted: &[VerifyingKey]) -> Result<VerifyingKey, BundleError> {
        if trusted.is_empty() {
            return Err(BundleError::NoTrustedKeys);
        }
        let signature = Signature::from_bytes(&self.signature);
        let signer = trusted
            .iter()
            .find(|k| k.verify(&self.manifest_bytes, &signature).is_ok())
            .ok_or_else(|| BundleError::Untrusted {
                trusted: trusted.iter().map(key_id).collect::<Vec<_>>().join(", "),
            })?;
        let actual = sha256_hex(&self.onnx);
        if !actual.eq_ignore_ascii_case(&self.manifest.onnx_sha256) {
            return Err(BundleError::OnnxMismatch {
                expected: self.manifest.onnx_sha256.clone(),
                actual,
            });
        }
        self.check_golden()?;
        if let (Some(g), Some(bytes)) = (&self.manifest.golden, &self.golden) {
            let actual = sha256_hex(bytes);
            if !actual.eq_ignore_ascii_case(&g.sha256) {
                return Err(BundleError::Golden(format!(
                    "its sha256 is {actual}, the manifest says {} (changed after signing)",
                    g.sha256
                )));
            }
        }
        Ok(*signer)
    }
}

/// A new signing key from the operating system's random source.
pub fn generate_key() -> Result<SigningKey, BundleError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| BundleError::Key {
        path: PathBuf::from("(random source)"),
        detail: e.to_string(),
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Key files are one line of hex: the 32-byte secret seed, or the 32-byte public key.
fn read_hex_key(path: &Path, what: &str) -> Result<[u8; 32], BundleError> {
    let err = |detail: String| BundleError::Key {
        path: path.to_owned(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let bytes = hex::decode(text.trim())
        .map_err(|e| err(format!("expected 64 hex digits ({what}): {e}")))?;
    bytes
        .as_slice()
        .try_into()
        .map_err(|_| err(format!("expected 32 bytes ({what}), found {}", bytes.len())))
}

pub fn read_signing_key(path: &Path) -> Result<SigningKey, BundleError> {
    Ok(SigningKey::from_bytes(&read_hex_key(
        path,
        "an ed25519 secret key",
    )?))
}

/// Reads a public key file, or a key given inline as 64 hex digits.
pub fn read_verifying_key(path_or_hex: &str) -> Result<VerifyingKey, BundleError> {
    let path = Path::new(path_or_hex);
    let inline: Option<[u8; 32]> = if path.exists() {
        None
    } else {
        hex::decode(path_or_hex.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
    };
    let bytes = match inline {
        Some(b) => b,
        None => read_hex_key(path, "an ed25519 public key")?,
    };
    VerifyingKey::from_bytes(&bytes).map_err(|e| BundleError::Key {
        path: path.to_owned(),
        detail: format!("not an ed25519 public key: {e}"),
    })
}

/// Writes `NAME.key` (the secret, readable by its owner only) and `NAME.pub` beside it;
/// refuses to overwrite an existing secret key.
pub fn write_key_pair(secret_path: &Path, key: &SigningKey) -> Result<PathBuf, BundleError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| BundleError::Io { path, source }
    };
    let public_path = secret_path.with_extension("pub");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(secret_path).map_err(io_err(secret_path))?;
    io::Write::write_all(
        &mut file,
        format!("{}\n", hex::encode(key.to_bytes())).as_bytes(),
    )
    .map_err(io_err(secret_path))?;
    file.sync_all().map_err(io_err(secret_path))?;
    crate::fsutil::write_atomic(
        &public_path,
        format!("{}\n", hex::encode(key.verifying_key().as_bytes())).as_bytes(),
    )
    .map_err(io_err(&public_path))?;
    Ok(public_path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{InputSpec, Quantization};

    fn manifest() -> ModelManifest {
        ModelManifest {
            name: "weld-mbv2".into(),
            version: "1".into(),
            created: chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap_or_default(),
            architecture: "mobilenet_v2".into(),
            classes: ["good", "porosity"].map(String::from).to_vec(),
            input: InputSpec::rgb(224),
            onnx_sha256: String::new(),
            quantization: Quantization::F32,
            metrics: Default::default(),
            lineage: Default::default(),
            golden: None,
        }
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn signed() -> Bundle {
        match Bundle::sign(manifest(), b"not really onnx".to_vec(), None, &key(1)) {
            Ok(b) => b,
            Err(e) => panic!("signing failed: {e}"),
        }
    }

    fn tar_of(parts: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, bytes) in parts {
            let mut header = tar::Header::new_ustar();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            builder
                .append_data(&mut header, name, *bytes)
                .expect("tar into memory");
        }
        builder.into_inner().expect("tar into memory")
    }

    #[test]
    fn a_signed_bundle_round_trips_and_verifies() {
        let b = signed();
        let bytes = b.to_tar().expect("tar");
        let back = Bundle::from_reader(bytes.as_slice()).expect("reads back");
        assert_eq!(back.manifest, b.manifest);
        assert_eq!(back.manifest.onnx_sha256, sha256_hex(b"not really onnx"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("onnx");
        std::fs::write(&file, b"not really onnx").unwrap();
        assert_eq!(
            sha256_file_hex(&file).unwrap(),
            sha256_hex(b"not really onnx")
        );
        let signer = back
            .verify(&[key(2).verifying_key(), key(1).verifying_key()])
            .expect("verifies");
        assert_eq!(signer, key(1).verifying_key());
    }

    #[test]
    fn every_kind_of_tampering_is_named() {
        let b = signed();
        let trusted = [key(1).verifying_key()];
        // Another signer.
        let other = Bundle::sign(manifest(), b.onnx.clone(), None, &key(3)).expect("signs");
        let e = other.verify(&trusted).expect_err("wrong key");
        assert!(matches!(e, BundleError::Untrusted { .. }), "{e}");
        assert!(e.to_string().contains(&key_id(&trusted[0])), "{e}");
        // The ONNX swapped after signing.
        let mut swapped = b.clone();
        swapped.onnx.push(0);
        let e = swapped.verify(&trusted).expect_err("changed onnx");
        assert!(matches!(e, BundleError::OnnxMismatch { .. }), "{e}");
        // The manifest edited after signing (one class renamed).
        let text = String::from_utf8(b.manifest_bytes.clone()).expect("utf-8");
        let edited = text.replace("porosity", "porosite");
        let tar = tar_of(&[
            (MANIFEST_FILE, edited.as_bytes()),
            (MODEL_FILE, &b.onnx),
            (SIGNATURE_FILE, &b.signature),
        ]);
        let e = Bundle::from_reader(tar.as_slice())
            .expect("still a bundle")
            .verify(&trusted)
            .expect_err("edited manifest");
        assert!(matches!(e, BundleError::Untrusted { .. }), "{e}");
        assert!(matches!(b.verify(&[]), Err(BundleError::NoTrustedKeys)));
    }

    /// A bundle with two golden inputs of a 2-channel 4x3 input.
    fn with_golden() -> Bundle {
        let mut m = manifest();
        m.input = InputSpec {
            channels: vec![crate::manifest::Channel::R, crate::manifest::Channel::G],
            size: [4, 3],
            mean: vec![0.5; 2],
            std: vec![0.25; 2],
            ..InputSpec::rgb(4)
        };
        m.golden = Some(crate::manifest::Golden {
            sha256: String::new(),
            count: 2,
            logits: vec![vec![1.0, -2.0], vec![0.5, 3.0]],
            backend: "tract".into(),
            tolerance: 1e-3,
        });
        let inputs = ndarray::Array4::from_shape_fn((2, 2, 3, 4), |(n, c, y, x)| {
            (n * 100 + c * 10 + y * 4 + x) as f32 / 7.0
        });
        let golden = Bundle::golden_bytes(&inputs);
        Bundle::sign(m, b"onnx".to_vec(), Some(golden), &key(1)).expect("signs")
    }

    #[test]
    fn golden_inputs_travel_signed_and_are_checked() {
        let b = with_golden();
        let trusted = [key(1).verifying_key()];
        let tar = b.to_tar().expect("tar");
        let back = Bundle::from_reader(tar.as_slice()).expect("reads back");
        back.verify(&trusted).expect("verifies");
        let x = back.golden_inputs().expect("golden inputs");
        assert_eq!(x.shape(), &[2, 2, 3, 4]);
        assert_eq!(x[[1, 1, 2, 3]], (100 + 10 + 8 + 3) as f32 / 7.0);
        let g = back.manifest.golden.as_ref().expect("golden");
        assert_eq!(g.deviation(0, &[1.0, -2.0]), Some(0.0));
        // 0.03 off with the largest |logit| 2: 1.5 % of it.
        let d = g.deviation(0, &[1.03, -2.0]).expect("same width");
        assert!((d - 0.015).abs() < 1e-6, "{d}");
        assert_eq!(g.deviation(0, &[1.0]), None);
        assert_eq!(g.deviation(0, &[f32::NAN, -2.0]), Some(f32::INFINITY));

        // Inputs changed after signing.
        let mut changed = back.clone();
        if let Some(bytes) = changed.golden.as_mut() {
            bytes[0] ^= 1;
        }
        let e = changed.verify(&trusted).expect_err("changed golden");
        assert!(
            e.to_string().contains("golden.bin") && e.to_string().contains("sha256"),
            "{e}"
        );
        // Missing, cut short, or there without a check in the manifest.
        let parts = |golden: Option<&[u8]>, manifest: &[u8]| {
            let mut p: Vec<(&str, &[u8])> = vec![
                (MANIFEST_FILE, manifest),
                (MODEL_FILE, &b.onnx),
                (SIGNATURE_FILE, &b.signature),
            ];
            p.extend(golden.map(|g| (GOLDEN_FILE, g)));
            tar_of(&p)
        };
        let gold = b.golden.clone().expect("golden bytes");
        let e =
            Bundle::from_reader(parts(None, &b.manifest_bytes).as_slice()).expect_err("missing");
        assert!(matches!(e, BundleError::Missing(GOLDEN_FILE)), "{e}");
        let e = Bundle::from_reader(parts(Some(&gold[..40]), &b.manifest_bytes).as_slice())
            .expect_err("short");
        assert!(
            e.to_string().contains("40 bytes") && e.to_string().contains("192"),
            "{e}"
        );
        let plain = signed();
        let e = Bundle::from_reader(parts(Some(&gold), &plain.manifest_bytes).as_slice())
            .expect_err("unasked");
        assert!(e.to_string().contains("no golden check"), "{e}");
        // Signing refuses one without the other.
        let e = Bundle::sign(manifest(), b"onnx".to_vec(), Some(gold), &key(1))
            .expect_err("inputs without a check");
        assert!(matches!(e, BundleError::Golden(_)), "{e}");
    }

    #[test]
    fn malformed_bundles_are_refused_naming_the_problem() {
        let b = signed();
        let full = b.to_tar().expect("tar");
        // Cut short: in the middle of the ONNX.
        let e = Bundle::from_reader(&full[..full.len() / 2]).expect_err("truncated");
        assert!(
            matches!(e, BundleError::NotABundle(_) | BundleError::Missing(_)),
            "{e}"
        );
        let unsigned = tar_of(&[(MANIFEST_FILE, &b.manifest_bytes), (MODEL_FILE, &b.onnx)]);
        let e = Bundle::from_reader(unsigned.as_slice()).expect_err("unsigned");
        assert!(e.to_string().contains("no manifest.sig"), "{e}");
        let extra = tar_of(&[
            (MANIFEST_FILE, &b.manifest_bytes),
            (MODEL_FILE, &b.onnx),
            (SIGNATURE_FILE, &b.signature),
            ("run.sh", b"rm -rf /"),
        ]);
        let e = Bundle::from_reader(extra.as_slice()).expect_err("extra file");
        assert!(
            matches!(e, BundleError::Unexpected(ref n) if n == "run.sh"),
            "{e}"
        );
        let short_sig = tar_of(&[
            (MANIFEST_FILE, &b.manifest_bytes),
            (MODEL_FILE, &b.onnx),
            (SIGNATURE_FILE, &b.signature[..10]),
        ]);
        let e = Bundle::from_reader(short_sig.as_slice()).expect_err("short signature");
        assert!(matches!(e, BundleError::SignatureSize(10)), "{e}");
        let bad_manifest = tar_of(&[
            (MANIFEST_FILE, b"{\"name\": 1}"),
            (MODEL_FILE, &b.onnx),
            (SIGNATURE_FILE, &b.signature),
        ]);
        let e = Bundle::from_reader(bad_manifest.as_slice()).expect_err("bad manifest");
        assert!(matches!(e, BundleError::Manifest(_)), "{e}");
        let e = Bundle::from_reader(&b"plain text, not a tar at all"[..]).expect_err("not tar");
        assert!(
            matches!(e, BundleError::NotABundle(_) | BundleError::Missing(_)),
            "{e}"
        );
    }

    #[test]
    fn key_files_round_trip_and_the_secret_is_not_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("line3.key");
        let k = generate_key().expect("random key");
        let public = write_key_pair(&secret, &k).expect("writes");
        assert_eq!(public, dir.path().join("line3.pub"));
        assert_eq!(
            read_signing_key(&secret).expect("reads").to_bytes(),
            k.to_bytes()
        );
        let p = public.to_string_lossy().into_owned();
        assert_eq!(read_verifying_key(&p).expect("reads"), k.verifying_key());
        let inline = hex::encode(k.verifying_key().as_bytes());
        assert_eq!(
            read_verifying_key(&inline).expect("inline"),
            k.verifying_key()
        );
        assert!(write_key_pair(&secret, &generate_key().expect("key")).is_err());
        assert_eq!(
            read_signing_key(&secret).expect("reads").to_bytes(),
            k.to_bytes()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&secret)
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "secret key readable by others: {mode:o}");
        }
        std::fs::write(&secret, "zz\n").expect("write");
        let e = read_signing_key(&secret).expect_err("not hex");
        assert!(e.to_string().contains("line3.key"), "{e}");
    }
}
