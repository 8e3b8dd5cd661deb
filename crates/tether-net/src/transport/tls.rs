//! TLS for the transports: server certificates from PEM files or generated
//! on the spot, and client verification against system roots, a CA file or a
//! pinned certificate fingerprint.

use anyhow::{anyhow, bail, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::path::Path;
use std::sync::Arc;

/// The crypto provider every TLS config here uses (ring: small and fast to build).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server certificate chain and key, ready for a [`ServerConfig`].
pub struct ServerIdentity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
}

impl ServerIdentity {
    /// Loads a PEM certificate chain and a PEM private key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let chain = CertificateDer::pem_file_iter(cert)
            .with_context(|| format!("reading certificate {}", cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing certificate {}", cert.display()))?;
        if chain.is_empty() {
            bail!("no certificate found in {}", cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("reading private key {}", key.display()))?;
        Ok(ServerIdentity { chain, key })
    }

    /// Generates a self-signed certificate for `names` (for trials; clients
    /// must pin its fingerprint or skip verification).
    pub fn self_signed(names: &[String]) -> anyhow::Result<Self> {
        let ck = rcgen::generate_simple_self_signed(names.to_vec())
            .context("generating a self-signed certificate")?;
        let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der())
            .map_err(|e| anyhow!("self-signed key: {e}"))?;
        Ok(ServerIdentity {
            chain: vec![ck.cert.der().clone()],
            key,
        })
    }

    /// SHA-256 fingerprint of the leaf certificate, as colon-separated hex.
    pub fn fingerprint(&self) -> String {
        self.chain.first().map(fingerprint).unwrap_or_default()
    }

    /// A rustls server config offering `alpn` protocols.
    pub fn server_config(&self, alpn: &[&[u8]]) -> anyhow::Result<Arc<ServerConfig>> {
        self.server_config_with_client_ca(alpn, None)
    }

    /// Like [`ServerIdentity::server_config`]; with `client_ca`, clients
    /// may present a certificate issued by one of its CAs (checked by
    /// rustls; a client without one still connects and authenticates
    /// otherwise, e.g. with a token).
    pub fn server_config_with_client_ca(
        &self,
        alpn: &[&[u8]],
        client_ca: Option<&Path>,
    ) -> anyhow::Result<Arc<ServerConfig>> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(path)
                    .with_context(|| format!("reading client CA {}", path.display()))?
                {
                    roots
                        .add(c.with_context(|| format!("parsing client CA {}", path.display()))?)
                        .context("adding client CA certificate")?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .allow_unauthenticated()
                .build()
                .context("client CA")?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut cfg = builder
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .context("certificate and key do not match")?;
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }
}

/// SHA-256 of a certificate's DER bytes, as `AB:CD:...`.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    d.as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn normalize_fingerprint(s: &str) -> String {
    s.chars()
        .filter(char::is_ascii_hexdigit)
        .collect::<String>()
        .to_ascii_uppercase()
}

/// How a client checks the server's certificate.
#[derive(Debug, Clone, Default)]
pub enum ServerTrust {
    /// The operating system's root store.
    #[default]
    SystemRoots,
    /// Only certificates issued by the CAs in this PEM file.
    CaFile(std::path::PathBuf),
    /// Exactly the certificate with this SHA-256 fingerprint (any name, any issuer).
    Fingerprint(String),
    /// Any certificate at all (the handshake signature is still checked).
    /// Only for an agent's self-signed in-cluster services that the user
    /// explicitly marked `tls_verify = false`; never for the tunnel itself.
    AnyCertificate,
}

/// Builds a client TLS config for the given trust rule.
pub fn client_config(trust: &ServerTrust) -> anyhow::Result<Arc<ClientConfig>> {
    client_config_with_identity(trust, None)
}

/// Like [`client_config`], presenting `identity` as a client certificate
/// (mutual TLS) when given.
pub fn client_config_with_identity(
    trust: &ServerTrust,
    identity: Option<&ServerIdentity>,
) -> anyhow::Result<Arc<ClientConfig>> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let wants_cert = match trust {
        ServerTrust::SystemRoots => {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                let why: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
                bail!(
                    "no system root certificates found{}; use a CA file or a fingerprint",
                    if why.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", why.join("; "))
                    }
                );
            }
            for e in &found.errors {
                tracing::debug!("system root certificates: {e}");
            }
            builder.with_root_certificates(roots)
        }
        ServerTrust::CaFile(path) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading CA file {}", path.display()))?
            {
                roots
                    .add(c.with_context(|| format!("parsing CA file {}", path.display()))?)
                    .context("adding CA certificate")?;
            }
            builder.with_root_certificates(roots)
        }
        ServerTrust::Fingerprint(fp) => {
            let want = normalize_fingerprint(fp);
            if want.len() != 64 {
                bail!(
                    "a SHA-256 fingerprint has 64 hex digits, got {}",
                    want.len()
                );
            }
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCert {
                    want: Some(want),
                    provider: provider(),
                }))
        }
        ServerTrust::AnyCertificate => {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCert {
                    want: None,
                    provider: provider(),
                }))
        }
    };
    let mut cfg = match identity {
        None => wants_cert.with_no_client_auth(),
        Some(id) => wants_cert
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .context("client certificate and key do not match")?,
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts exactly one certificate, by fingerprint (or any, when `want` is
/// `None`); still checks that the handshake was signed by that
/// certificate's key.
#[derive(Debug)]
struct PinnedCert {
    want: Option<String>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self
            .want
            .as_ref()
            .is_none_or(|w| normalize_fingerprint(&fingerprint(end_entity)) == *w)
        {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate fingerprint {} does not match the pinned one",
                fingerprint(end_entity)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_normalize() {
        let id = ServerIdentity::self_signed(&["localhost".into()]).unwrap();
        let fp = id.fingerprint();
        assert_eq!(fp.len(), 95);
        assert_eq!(normalize_fingerprint(&fp.to_lowercase()).len(), 64);
        assert!(client_config(&ServerTrust::Fingerprint(fp)).is_ok());
        assert!(client_config(&ServerTrust::Fingerprint("abc".into())).is_err());
    }
}
