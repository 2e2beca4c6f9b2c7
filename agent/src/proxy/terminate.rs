//! TLS termination at a gateway (an HTTPS server, or a TLS server with `tls.mode: SIMPLE`): the
//! certificate is chosen by the client's SNI among the servers sharing the port. A certificate
//! from a Secret comes in the config (a rotated Secret is a new config); one from files is
//! re-read when the files change, checked on each handshake, so rotation needs no restart. A
//! rotation that does not parse keeps the last good certificate, and says so.
use std::{
    fmt, fs, io,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tracing::warn;

use super::{CONNECT_TIMEOUT, Io};

/// The certificates of one gateway port, and the TLS config that presents them.
pub struct ServerTls {
    config: Arc<ServerConfig>,
    certs: Arc<Certs>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerTls({})", self.certs.describe())
    }
}

/// In the admin endpoint's state: where each certificate comes from, never the keys.
impl serde::Serialize for ServerTls {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.certs.0.iter().map(|e| &e.source))
    }
}

impl ServerTls {
    /// `http`: offer HTTP/2 and HTTP/1.1 by ALPN (an HTTPS server).
    pub fn compile(certs: &[trellis_api::ServerCertificate], http: bool) -> Self {
        let certs = Arc::new(Certs(certs.iter().map(Entry::compile).collect()));
        let mut config = ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("the provider supports the default versions")
            .with_no_client_auth()
            .with_cert_resolver(certs.clone());
        if http {
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        }
        Self {
            config: Arc::new(config),
            certs,
        }
    }

    /// Completes the server side of a handshake; the error names the certificates on offer.
    pub async fn accept<C: Io>(&self, client: C) -> io::Result<TlsStream<C>> {
        let accept = TlsAcceptor::from(self.config.clone()).accept(client);
        match tokio::time::timeout(CONNECT_TIMEOUT, accept).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(io::Error::other(format!(
                "TLS handshake failed: {e} (certificates: {})",
                self.certs.describe()
            ))),
            Err(_) => Err(io::Error::other("TLS handshake timed out")),
        }
    }
}

/// Host `name` is covered by `pattern` (`*`, `*.example.com` or a name); how specific the match
/// is (an exact name beats the longest wildcard, which beats `*`), None for no match.
pub fn host_match(pattern: &str, name: &str) -> Option<usize> {
    let (pattern, name) = (pattern.to_ascii_lowercase(), name.to_ascii_lowercase());
    match pattern.strip_prefix('*') {
        Some("") => Some(0),
        Some(suffix) if name.len() > suffix.len() && name.ends_with(suffix) => Some(suffix.len()),
        Some(_) => None,
        None => (pattern == name).then_some(usize::MAX),
    }
}

/// The most specific of `items` (by their host patterns) for `name`.
pub fn best<'a, T>(items: &'a [T], hosts: impl Fn(&T) -> &[String], name: &str) -> Option<&'a T> {
    items
        .iter()
        .filter_map(|i| {
            Some((
                hosts(i).iter().filter_map(|h| host_match(h, name)).max()?,
                i,
            ))
        })
        // The first of equally specific ones, as servers are listed.
        .fold(None, |acc: Option<(usize, &T)>, (score, i)| match acc {
            Some((s, _)) if s >= score => acc,
            _ => Some((score, i)),
        })
        .map(|(_, i)| i)
}

#[derive(Debug)]
struct Certs(Vec<Entry>);

impl Certs {
    fn describe(&self) -> String {
        let all: Vec<String> = self.0.iter().map(|e| e.source.clone()).collect();
        all.join(", ")
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // No SNI (a client that connected by address): the first server's certificate.
        let entry = match hello.server_name() {
            Some(name) => best(&self.0, |e| &e.hosts, name)?,
            None => self.0.first()?,
        };
        entry.key()
    }
}

/// One server's certificate.
#[derive(Debug)]
struct Entry {
    hosts: Vec<String>,
    /// For logs: the Secret or the certificate file.
    source: String,
    key: Key,
}

enum Key {
    /// From a Secret (checked by control, parsed here once).
    Loaded(Arc<CertifiedKey>),
    Files {
        cert: PathBuf,
        key: PathBuf,
        /// The files as last read (their modification times and sizes) and what they held.
        cache: Mutex<Option<(Stamp, Option<Arc<CertifiedKey>>)>>,
        /// The last good certificate, kept while a rotation does not parse.
        good: Mutex<Option<Arc<CertifiedKey>>>,
    },
    /// Not usable (a missing Secret, or PEM that does not parse): handshakes fail.
    Missing,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Key::Loaded(_) => "Loaded",
            Key::Files { .. } => "Files",
            Key::Missing => "Missing",
        })
    }
}

type Stamp = [(Option<SystemTime>, u64); 2];

impl Entry {
    fn compile(c: &trellis_api::ServerCertificate) -> Self {
        let key = if !c.cert_file.is_empty() {
            Key::Files {
                cert: PathBuf::from(&c.cert_file),
                key: PathBuf::from(&c.key_file),
                cache: Mutex::new(None),
                good: Mutex::new(None),
            }
        } else {
            match certified(c.cert_pem.as_bytes(), c.key_pem.as_bytes()) {
                Ok(k) => Key::Loaded(Arc::new(k)),
                Err(e) => {
                    if !c.cert_pem.is_empty() {
                        warn!(source = c.source, "gateway certificate not usable: {e}");
                    }
                    Key::Missing
                }
            }
        };
        Self {
            hosts: c.hosts.clone(),
            source: c.source.clone(),
            key,
        }
    }

    fn key(&self) -> Option<Arc<CertifiedKey>> {
        match &self.key {
            Key::Loaded(k) => Some(k.clone()),
            Key::Missing => None,
            Key::Files {
                cert,
                key,
                cache,
                good,
            } => {
                let stamp = [stamp(cert), stamp(key)];
                let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((s, k)) = &*cache
                    && *s == stamp
                {
                    return k.clone().or_else(|| good.lock().ok()?.clone());
                }
                let read = fs::read(cert)
                    .map_err(|e| format!("reading {}: {e}", cert.display()))
                    .and_then(|c| {
                        let k =
                            fs::read(key).map_err(|e| format!("reading {}: {e}", key.display()))?;
                        certified(&c, &k)
                    });
                let mut good = good.lock().unwrap_or_else(|e| e.into_inner());
                let loaded = match read {
                    Ok(k) => {
                        let k = Arc::new(k);
                        *good = Some(k.clone());
                        Some(k)
                    }
                    Err(e) => {
                        let kept = if good.is_some() {
                            "keeping the last good one"
                        } else {
                            "handshakes fail until it is fixed"
                        };
                        warn!(
                            source = self.source,
                            "gateway certificate not usable: {e}; {kept}"
                        );
                        None
                    }
                };
                *cache = Some((stamp, loaded.clone()));
                loaded.or_else(|| good.clone())
            }
        }
    }
}

fn stamp(path: &PathBuf) -> (Option<SystemTime>, u64) {
    fs::metadata(path).map_or((None, 0), |m| (m.modified().ok(), m.len()))
}

/// A certificate chain and its key from PEM, checked to belong together.
fn certified(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    if chain.is_empty() {
        return Err("no PEM certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("private key: {e}"))?;
    CertifiedKey::from_der(chain, key, &crate::tls::provider())
        .map_err(|e| format!("certificate and key: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_host_wins() {
        assert_eq!(host_match("shop.example", "SHOP.example"), Some(usize::MAX));
        assert_eq!(
            host_match("*.example", "shop.example"),
            Some(".example".len())
        );
        assert_eq!(host_match("*.example", "example"), None);
        assert_eq!(host_match("*", "anything"), Some(0));
        assert_eq!(host_match("a.example", "b.example"), None);
        let items = vec![
            vec!["*".to_owned()],
            vec!["*.example".to_owned()],
            vec!["shop.example".to_owned()],
            vec!["*.shop.example".to_owned()],
        ];
        let pick = |name| best(&items, |h| h, name).map(|h| h[0].as_str());
        assert_eq!(pick("shop.example"), Some("shop.example"));
        assert_eq!(pick("cart.shop.example"), Some("*.shop.example"));
        assert_eq!(pick("other.example"), Some("*.example"));
        assert_eq!(pick("elsewhere.org"), Some("*"));
        assert_eq!(best(&items[1..], |h| h, "elsewhere.org"), None);
    }

    fn pem(host: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![host.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn files_are_reread_when_they_change_and_a_bad_rotation_keeps_the_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (c1, k1) = pem("one.example");
        fs::write(&cert, &c1).unwrap();
        fs::write(&key, &k1).unwrap();
        let entry = Entry::compile(&trellis_api::ServerCertificate {
            hosts: vec!["*".into()],
            cert_file: cert.display().to_string(),
            key_file: key.display().to_string(),
            source: cert.display().to_string(),
            ..Default::default()
        });
        let first = entry.key().unwrap();
        assert!(Arc::ptr_eq(&first, &entry.key().unwrap()), "read once");
        // A rotation (written in a later second, so the stamp differs even by size alone).
        let (c2, k2) = pem("two.example.with.a.longer.name");
        fs::write(&cert, &c2).unwrap();
        fs::write(&key, &k2).unwrap();
        let second = entry.key().unwrap();
        assert_ne!(first.cert, second.cert);
        // A half-written rotation (the old key with the new certificate) keeps the last good.
        let (c3, _) = pem("three.example.with.an.even.longer.name");
        fs::write(&cert, &c3).unwrap();
        let kept = entry.key().unwrap();
        assert_eq!(kept.cert, second.cert);
        // Gone entirely: still the last good one.
        fs::remove_file(&cert).unwrap();
        assert_eq!(entry.key().unwrap().cert, second.cert);
    }

    #[test]
    fn a_missing_or_mismatched_secret_serves_nothing() {
        let (c, _) = pem("a.example");
        let (_, other_key) = pem("b.example");
        for (cert_pem, key_pem) in [(String::new(), String::new()), (c, other_key)] {
            let entry = Entry::compile(&trellis_api::ServerCertificate {
                hosts: vec!["*".into()],
                cert_pem,
                key_pem,
                source: "Secret x/y".into(),
                ..Default::default()
            });
            assert!(entry.key().is_none());
        }
    }
}
