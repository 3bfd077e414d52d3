//! TLS on the two network hops every process makes: Postgres and RabbitMQ.
//!
//! Postgres reads `sslmode` and `sslrootcert` from `DATABASE_URL` as libpq does (tokio-postgres
//! knows only `disable`/`prefer`/`require` and no CA file, so the two are taken out here and
//! the rest is handed to it):
//!
//! | `sslmode` | encrypted | certificate checked |
//! |---|---|---|
//! | `disable` | no | — |
//! | `allow`, `prefer` (the default) | when the server offers it | no |
//! | `require` | yes | no; against `sslrootcert` when one is named (as libpq) |
//! | `verify-ca` | yes | signed by a CA in `sslrootcert` |
//! | `verify-full` | yes | signed by a CA in `sslrootcert` and naming the host |
//!
//! RabbitMQ: an `amqps://` URL is TLS with the host checked against the certificate, signed by
//! a CA of the system's or the one in the URL's `cacertfile` (RabbitMQ's own URI query
//! parameter).
//!
//! A certificate that does not verify is a verdict, not an outage: [`rejected`] tells the two
//! apart, so a process with the wrong CA stops at start with the reason instead of retrying.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{Error, Result};

/// How a Postgres connection uses TLS (libpq's `sslmode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self> {
        Ok(match value {
            "disable" => Self::Disable,
            "allow" | "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => {
                return Err(Error::invalid(format!(
                    "DATABASE_URL: sslmode={other} is not one of disable, allow, prefer, \
                     require, verify-ca, verify-full"
                )));
            }
        })
    }
}

/// A Postgres connection string made ready to connect: the settings tokio-postgres reads and
/// the TLS connector `sslmode` asks for.
pub struct Postgres {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
}

impl Postgres {
    /// Reads `url` (a `postgres://` URL or `key=value` pairs).
    pub fn parse(url: &str) -> Result<Self> {
        let (rest, mode, root) = take_tls_params(url)?;
        let mut config: tokio_postgres::Config = rest.parse().map_err(|e| {
            Error::invalid(format!(
                "DATABASE_URL is not a valid connection string: {e}"
            ))
        })?;
        let mode = mode.unwrap_or(SslMode::Prefer);
        config.ssl_mode(match mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        // The CA to check the certificate against, and whether the host is checked too.
        let (ca, host) = match (mode, root) {
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(Error::invalid(
                    "DATABASE_URL: sslmode=verify-ca and verify-full need sslrootcert=<CA file> \
                     (the system bundle is /etc/ssl/certs/ca-certificates.crt)",
                ));
            }
            (SslMode::VerifyFull, Some(ca)) => (Some(ca), true),
            // libpq: with a root certificate named, `require` checks it as verify-ca does.
            (SslMode::VerifyCa | SslMode::Require, Some(ca)) => (Some(ca), false),
            (_, _) => (None, false),
        };
        Ok(Self {
            config,
            tls: MakeRustlsConnect::new(client_config(ca.as_deref(), host)?),
        })
    }
}

/// Opens one connection (no pool) and drives it on its own task. A TLS handshake refused on
/// its merits is an [`Error::invalid`] saying why.
pub async fn connect_postgres(url: &str) -> Result<tokio_postgres::Client> {
    let pg = Postgres::parse(url)?;
    let (client, connection) = pg.config.connect(pg.tls).await.map_err(|e| {
        if rejected(&e) {
            Error::invalid(format!(
                "cannot connect to Postgres over TLS: {}",
                explain(&e)
            ))
        } else {
            e.into()
        }
    })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
}

/// Splits `sslmode` and `sslrootcert` off a connection string; the rest is left as written.
fn take_tls_params(url: &str) -> Result<(String, Option<SslMode>, Option<String>)> {
    const KEYS: &[&str] = &["sslmode", "sslrootcert"];
    let (rest, taken) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        take_query(url, KEYS)
    } else {
        let (mut kept, mut taken) = (Vec::new(), Vec::new());
        for word in url.split_whitespace() {
            match word.split_once('=') {
                Some((key, value)) if KEYS.contains(&key) => {
                    taken.push((key.to_string(), value.trim_matches('\'').to_string()));
                }
                _ => kept.push(word),
            }
        }
        (kept.join(" "), taken)
    };
    let (mut mode, mut root) = (None, None);
    for (key, value) in taken {
        match key.as_str() {
            "sslmode" => mode = Some(SslMode::parse(&value)?),
            _ => root = Some(value),
        }
    }
    Ok((rest, mode, root))
}

/// Splits the parameters named `keys` off a URL's query, their values decoded; the rest of
/// the URL is left as written.
fn take_query(url: &str, keys: &[&str]) -> (String, Vec<(String, String)>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), Vec::new());
    };
    let (mut kept, mut taken) = (Vec::new(), Vec::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if keys.contains(&key) {
            let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
            taken.push((key.to_string(), value.into_owned()));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, taken)
}

/// The TLS settings of an `amqps://` URL: the URL without `cacertfile`, and the CA to trust
/// beside the system's.
pub fn amqp(url: &str) -> Result<(String, lapin::tcp::OwnedTLSConfig)> {
    let (rest, ca) = take_query(url, &["cacertfile"]);
    let mut tls = lapin::tcp::OwnedTLSConfig::default();
    if let Some((setting, path)) = ca.last() {
        tls.cert_chain = Some(read_pem(setting, path)?.0);
    }
    Ok((rest, tls))
}

/// The CA file an AMQP URL names (`cacertfile`), if it names one.
pub fn amqp_ca(url: &str) -> Option<String> {
    take_query(url, &["cacertfile"])
        .1
        .pop()
        .map(|(_, path)| path)
}

/// `e` and what caused it, one after the other (`a: b: c`): TLS failures say why only in
/// their causes.
pub fn explain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let said = c.to_string();
        if !out.contains(&said) {
            out.push_str(": ");
            out.push_str(&said);
        }
        cause = c.source();
    }
    out
}

/// Whether `e` (or what caused it) is a TLS handshake that failed on its merits: a certificate
/// that does not verify, or a server without the TLS the settings require. Retrying will not
/// help; the process should stop and say so.
pub fn rejected(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
        {
            return true;
        }
        if e.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        // tokio-postgres names its TLS failures but does not expose the kind.
        if e.downcast_ref::<tokio_postgres::Error>()
            .is_some_and(|pg| pg.to_string().starts_with("error performing TLS handshake"))
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// A client configuration that checks the server's certificate against the CA file `ca`
/// (with the host when `host`), or, without `ca`, encrypts only (as libpq does).
fn client_config(ca: Option<&str>, host: bool) -> Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(Error::internal)?;
    let chain = match ca {
        Some(path) => Some(
            WebPkiServerVerifier::builder_with_provider(
                Arc::new(read_pem("sslrootcert", path)?.1),
                provider.clone(),
            )
            .build()
            .map_err(|e| Error::invalid(format!("sslrootcert={path}: {e}")))?,
        ),
        None => None,
    };
    let verifier = Verifier {
        chain,
        algorithms: provider.signature_verification_algorithms,
        ca: format!("sslrootcert={}", ca.unwrap_or_default()),
        host,
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// The PEM file `setting` names at `path`, and the certificates it holds; an error naming
/// the file when it cannot be read or holds none.
fn read_pem(setting: &str, path: &str) -> Result<(String, RootCertStore)> {
    if path.is_empty() {
        return Err(Error::invalid(format!("{setting} is empty")));
    }
    let pem = std::fs::read_to_string(path)
        .map_err(|e| Error::invalid(format!("{setting}={path} cannot be read: {e}")))?;
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| Error::invalid(format!("{setting}={path} is not PEM: {e}")))?;
        store
            .add(cert)
            .map_err(|e| Error::invalid(format!("{setting}={path}: {e}")))?;
    }
    if store.is_empty() {
        return Err(Error::invalid(format!(
            "{setting}={path} holds no certificate"
        )));
    }
    Ok((pem, store))
}

/// The server's certificate as `sslmode` asks: unchecked without a CA (`prefer`, `require`
/// without `sslrootcert`: encryption only, as libpq), else the WebPKI check against the CA,
/// without the host for `verify-ca`, its failures said in the operator's terms (which CA
/// file, which host). The handshake's signatures are always checked, so the session is bound
/// to the key offered.
#[derive(Debug)]
struct Verifier {
    chain: Option<Arc<WebPkiServerVerifier>>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
    ca: String,
    host: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Reason(String);

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        let explain = |reason: String| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(Reason(reason)),
            )))
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.host => Ok(ServerCertVerified::assertion()),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Err(explain(format!(
                "the server's certificate does not name {} (sslmode=verify-full checks the host; \
                 connect by a name the certificate holds)",
                server_name.to_str()
            ))),
            Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
                Err(explain(format!(
                    "the server's certificate is not signed by a CA in {}",
                    self.ca
                )))
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_come_off_a_url_and_the_rest_stays_as_written() {
        let (rest, mode, root) = take_tls_params(
            "postgres://u:p%40w@h:5432/db?application_name=x&sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem",
        )
        .expect("read");
        assert_eq!(rest, "postgres://u:p%40w@h:5432/db?application_name=x");
        assert_eq!(mode, Some(SslMode::VerifyFull));
        assert_eq!(root.as_deref(), Some("/tmp/ca.pem"));

        let (rest, mode, root) =
            take_tls_params("host=h user=u sslmode=require dbname=d").expect("read");
        assert_eq!(rest, "host=h user=u dbname=d");
        assert_eq!(mode, Some(SslMode::Require));
        assert_eq!(root, None);

        assert!(take_tls_params("postgres://h/db?sslmode=verify").is_err());
    }

    #[test]
    fn verifying_without_a_ca_is_refused_at_once() {
        let e = Postgres::parse("postgres://h/db?sslmode=verify-full")
            .err()
            .expect("read");
        assert!(e.to_string().contains("sslrootcert"), "{e}");
        let e = Postgres::parse("postgres://h/db?sslmode=verify-ca&sslrootcert=/nonexistent")
            .err()
            .expect("read");
        assert!(e.to_string().contains("/nonexistent"), "{e}");
        assert_eq!(
            Postgres::parse("postgres://h/db")
                .expect("read")
                .config
                .get_ssl_mode(),
            tokio_postgres::config::SslMode::Prefer
        );
    }

    #[test]
    fn cacertfile_is_read_and_not_passed_on() {
        let (rest, tls) = amqp("amqps://u:p@h:5671/%2f").expect("read");
        assert_eq!(rest, "amqps://u:p@h:5671/%2f");
        assert!(tls.cert_chain.is_none(), "the system's CAs");
        let (rest, tls) = amqp("amqp://u:p@h:5672/%2f?heartbeat=10").expect("read");
        assert_eq!(rest, "amqp://u:p@h:5672/%2f?heartbeat=10");
        assert!(tls.cert_chain.is_none());
        let e = amqp("amqps://h/%2f?cacertfile=/nonexistent").expect_err("refused");
        assert!(e.to_string().contains("/nonexistent"), "{e}");
    }
}
