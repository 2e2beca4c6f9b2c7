//! The same work as the mesh, done by well-known software: two haproxies, one per node (each in
//! its own pod beside the client's and the server's), with mutual TLS 1.3 between them (both
//! sides present a certificate from one CA and require the other's). TCP (`mode tcp`) for the
//! echo and iperf3, HTTP (`mode http`, the mesh's route on the client's side) for the L7 runs:
//! client → haproxy (node 1) → mTLS → haproxy (node 2) → server, as client → agent → HBONE →
//! agent → server.
use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use anyhow::{Context as _, Result};
use trellis_e2e::Pod;

use super::{
    ECHO_PORT, IPERF_PORT,
    haproxy::{self, HaProxy, file, globals, route},
    l7,
};

/// The client-side haproxy listens as the server would (echo, iperf3) and on the single
/// haproxy's HTTP ports; the server-side one on these, in TLS.
const TLS_ECHO: u16 = 17000;
const TLS_IPERF: u16 = 15201;
const TLS_H1: u16 = 18080;
const TLS_H2: u16 = 18082;
/// The name in the server side's certificate, which the client side checks.
const SERVER_NAME: &str = "pair-server.bench";

/// Both haproxies; stopped (and their certificates removed) on drop.
pub struct Pair {
    pub client_side: HaProxy,
    pub server_side: HaProxy,
    /// The pod the client connects to.
    pub at: IpAddr,
    certs: Vec<PathBuf>,
}

impl Pair {
    /// haproxy in `near` (the client's node) and `far` (the server's), in front of `server`.
    pub fn start(near: &Pod, far: &Pod, server: &Pod) -> Result<Self> {
        let certs = certificates()?;
        let [ca, server_pem, client_pem] = [&certs[0], &certs[1], &certs[2]].map(|p| file(p));
        let app = IpAddr::V4(server.ip4);
        let tls_in = format!("ssl crt {server_pem} ca-file {ca} verify required");
        let server_side = globals("    ssl-default-bind-options ssl-min-ver TLSv1.3\n")
            + &format!(
                "frontend echo\n    mode tcp\n    bind :{TLS_ECHO} {tls_in}\n    default_backend echo\n\
                 frontend iperf\n    mode tcp\n    bind :{TLS_IPERF} {tls_in}\n    default_backend iperf\n\
                 frontend h1\n    mode http\n    bind :{TLS_H1} {tls_in} alpn http/1.1\n    default_backend h1\n\
                 frontend h2\n    mode http\n    bind :{TLS_H2} {tls_in} alpn h2\n    default_backend h2\n\
                 backend echo\n    mode tcp\n    server app {}\n\
                 backend iperf\n    mode tcp\n    server app {}\n\
                 backend h1\n    mode http\n    server app {}\n\
                 backend h2\n    mode http\n    server app {} proto h2\n",
                SocketAddr::new(app, ECHO_PORT),
                SocketAddr::new(app, IPERF_PORT),
                SocketAddr::new(app, l7::HTTP_PORT),
                SocketAddr::new(app, l7::HTTP_PORT),
            );
        let server_side = HaProxy::start(
            far,
            "trellis-bench-pair-server",
            &server_side,
            &[TLS_ECHO, TLS_IPERF, TLS_H1, TLS_H2],
        )?;
        let to = |port| SocketAddr::new(IpAddr::V4(far.ip4), port);
        let tls_out =
            format!("ssl crt {client_pem} ca-file {ca} verify required verifyhost {SERVER_NAME}");
        let route = route();
        let client_side = globals("    ssl-default-server-options ssl-min-ver TLSv1.3\n")
            + &format!(
                "frontend echo\n    mode tcp\n    bind :{ECHO_PORT}\n    default_backend echo\n\
                 frontend iperf\n    mode tcp\n    bind :{IPERF_PORT}\n    default_backend iperf\n\
                 frontend h1\n    mode http\n    bind :{h1}\n{route}    default_backend h1\n\
                 frontend h2\n    mode http\n    bind :{h2} proto h2\n{route}    default_backend h2\n\
                 backend echo\n    mode tcp\n    server far {} {tls_out}\n\
                 backend iperf\n    mode tcp\n    server far {} {tls_out}\n\
                 backend h1\n    mode http\n    server far {} {tls_out} alpn http/1.1\n\
                 backend h2\n    mode http\n    server far {} {tls_out} alpn h2\n",
                to(TLS_ECHO),
                to(TLS_IPERF),
                to(TLS_H1),
                to(TLS_H2),
                h1 = haproxy::H1_PORT,
                h2 = haproxy::H2_PORT,
            );
        let client_side = HaProxy::start(
            near,
            "trellis-bench-pair-client",
            &client_side,
            &[ECHO_PORT, IPERF_PORT, haproxy::H1_PORT, haproxy::H2_PORT],
        )?;
        Ok(Self {
            client_side,
            server_side,
            at: IpAddr::V4(near.ip4),
            certs,
        })
    }

    /// The two processes, for their CPU and memory.
    pub fn procs(&self) -> Vec<(String, u32)> {
        vec![
            ("haproxy node 1".into(), self.client_side.pid),
            ("haproxy node 2".into(), self.server_side.pid),
        ]
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for f in &self.certs {
            let _ = fs::remove_file(f);
        }
    }
}

/// A CA, and a certificate and key (one PEM file each, as haproxy's `crt` takes them) for each
/// side: [CA, server side, client side].
fn certificates() -> Result<Vec<PathBuf>> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "bench pair CA");
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let leaf = |name: &str| -> Result<String> {
        let key = rcgen::KeyPair::generate()?;
        let cert =
            rcgen::CertificateParams::new(vec![name.to_owned()])?.signed_by(&key, &issuer)?;
        Ok(cert.pem() + &key.serialize_pem())
    };
    let base = haproxy::files_dir().join(format!("trellis-bench-pair-{}", std::process::id()));
    let files = ["ca", "server", "client"].map(|n| base.with_extension(format!("{n}.pem")));
    for (path, pem) in files
        .iter()
        .zip([ca_pem, leaf(SERVER_NAME)?, leaf("pair-client.bench")?])
    {
        fs::write(path, pem).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(files.to_vec())
}
