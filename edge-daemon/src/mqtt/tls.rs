//! The rustls client config for `[mqtt.tls]`. Built here rather than by rumqttc's `Simple` TLS
//! option so that (a) the crypto provider is `ring`, explicitly (rustls' default pulls in
//! aws-lc, a C/cmake build that is slow and awkward to cross-compile for the board), and (b) a
//! wrong PEM file is reported when the config is checked, naming the file's role.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use super::config::TlsSettings;

/// A client config trusting the CA certificates of `tls`, presenting its client certificate
/// when it has one. Errors say which file is wrong.
pub fn client_config(tls: &TlsSettings) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&tls.ca_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("ca_file: not PEM certificates: {e}"))?;
    if cas.is_empty() {
        return Err("ca_file: no certificate in it".into());
    }
    for ca in cas {
        roots
            .add(ca)
            .map_err(|e| format!("ca_file: not a usable CA certificate: {e}"))?;
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots);
    let config = match &tls.client {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("client_cert: not PEM certificates: {e}"))?;
            if chain.is_empty() {
                return Err("client_cert: no certificate in it".into());
            }
            let key = PrivateKeyDer::from_pem_slice(key_pem)
                .map_err(|e| format!("client_key: no usable private key: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client_cert/client_key: {e}"))?
        }
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_named_by_its_file() {
        let bad = TlsSettings {
            ca_pem: b"not a certificate".to_vec(),
            client: None,
        };
        let err = client_config(&bad).unwrap_err();
        assert!(err.starts_with("ca_file:"), "{err}");
    }
}
