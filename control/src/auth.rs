//! Who may call control. Dir mode: agents present a bootstrap token (`authorization: Bearer …`)
//! read from a file; a holder may act for any node.
use tonic::{Status, metadata::MetadataMap};

pub enum Authenticator {
    BootstrapToken(String),
}

impl Authenticator {
    pub fn bootstrap_token_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let token = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading --bootstrap-token-file {}: {e}", path.display()))?
            .trim()
            .to_owned();
        anyhow::ensure!(
            token.len() >= 16,
            "the bootstrap token in {} is shorter than 16 characters",
            path.display()
        );
        Ok(Self::BootstrapToken(token))
    }

    /// Checks the caller's credentials allow acting for `node`.
    pub fn check(&self, meta: &MetadataMap, _node: &str) -> Result<(), Status> {
        let presented = meta
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>`"))?;
        match self {
            Authenticator::BootstrapToken(token)
                if constant_time_eq(presented.as_bytes(), token.as_bytes()) =>
            {
                Ok(())
            }
            Authenticator::BootstrapToken(_) => Err(Status::unauthenticated("bad token")),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_must_match() {
        let auth = Authenticator::BootstrapToken("0123456789abcdef".into());
        let mut meta = MetadataMap::new();
        assert_eq!(
            auth.check(&meta, "n").unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        meta.insert(
            "authorization",
            "Bearer wrong-token-000000".parse().unwrap(),
        );
        assert_eq!(
            auth.check(&meta, "n").unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        meta.insert("authorization", "Bearer 0123456789abcdef".parse().unwrap());
        assert!(auth.check(&meta, "n").is_ok());
    }
}
