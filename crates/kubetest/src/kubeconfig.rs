//! Kubeconfig files pointing at a [`crate::TestApiServer`], for kube-rs (`KUBECONFIG`),
//! kubectl and child processes such as `llmsched epp`.

use std::path::Path;

use base64::Engine as _;

use crate::Error;

/// A kubeconfig with one cluster, user and context (all named `kubetest`).
///
/// ```no_run
/// # async fn f() -> Result<(), llmsched_kubetest::Error> {
/// let server = llmsched_kubetest::TestApiServer::builder().tls(true).require_token("admin").start().await?;
/// let dir = std::env::temp_dir();
/// server.kubeconfig().namespace("llm-d").write(&dir.join("kubeconfig"))?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Kubeconfig {
    server: String,
    ca_pem: Option<String>,
    token: Option<String>,
    namespace: Option<String>,
    insecure: bool,
}

fn yaml_str(s: &str) -> String {
    // JSON strings are valid YAML double-quoted scalars.
    serde_json::Value::String(s.to_string()).to_string()
}

impl Kubeconfig {
    pub(crate) fn new(server: String, ca_pem: Option<String>, token: Option<String>) -> Self {
        Self {
            server,
            ca_pem,
            token,
            namespace: None,
            insecure: false,
        }
    }

    /// The bearer token the user presents (default: the server's admin token, if any).
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self
    }

    /// No token at all.
    pub fn no_token(mut self) -> Self {
        self.token = None;
        self
    }

    /// The context's default namespace.
    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = Some(ns.to_string());
        self
    }

    /// Leaves out the CA and sets `insecure-skip-tls-verify: true` instead.
    pub fn insecure_skip_tls_verify(mut self) -> Self {
        self.insecure = true;
        self
    }

    /// Overrides the server URL (e.g. to point at a port nothing listens on).
    pub fn server(mut self, url: &str) -> Self {
        self.server = url.to_string();
        self
    }

    /// The kubeconfig as YAML.
    pub fn to_yaml(&self) -> String {
        let mut cluster = format!("    server: {}\n", yaml_str(&self.server));
        if self.insecure {
            cluster.push_str("    insecure-skip-tls-verify: true\n");
        } else if let Some(ca) = &self.ca_pem {
            let b64 = base64::engine::general_purpose::STANDARD.encode(ca.as_bytes());
            cluster.push_str(&format!("    certificate-authority-data: {b64}\n"));
        }
        let user = match &self.token {
            Some(t) => format!("  user:\n    token: {}\n", yaml_str(t)),
            None => "  user: {}\n".to_string(),
        };
        let ns = self
            .namespace
            .as_ref()
            .map(|n| format!("    namespace: {}\n", yaml_str(n)))
            .unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kubetest\n  cluster:\n{cluster}users:\n- name: kubetest\n{user}contexts:\n- name: kubetest\n  context:\n    cluster: kubetest\n    user: kubetest\n{ns}current-context: kubetest\npreferences: {{}}\n"
        )
    }

    /// Writes the YAML to `path` (mode 0600 where supported, like kubectl does).
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        std::fs::write(path, self.to_yaml()).map_err(Error::Io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(Error::Io)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_parses_and_carries_everything() {
        let k = Kubeconfig::new(
            "https://127.0.0.1:1234".into(),
            Some("-----BEGIN CERTIFICATE-----\nabc\n".into()),
            Some("t0k\"en".into()),
        )
        .namespace("llm-d");
        let v: serde_json::Value = serde_norway::from_str(&k.to_yaml()).unwrap();
        assert_eq!(
            v["clusters"][0]["cluster"]["server"],
            "https://127.0.0.1:1234"
        );
        let ca = v["clusters"][0]["cluster"]["certificate-authority-data"]
            .as_str()
            .unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(ca)
            .unwrap();
        assert!(decoded.starts_with(b"-----BEGIN CERTIFICATE-----"));
        assert_eq!(v["users"][0]["user"]["token"], "t0k\"en");
        assert_eq!(v["contexts"][0]["context"]["namespace"], "llm-d");
        assert_eq!(v["current-context"], "kubetest");
        let anon: serde_json::Value =
            serde_norway::from_str(&k.clone().no_token().insecure_skip_tls_verify().to_yaml())
                .unwrap();
        assert!(anon["users"][0]["user"].as_object().unwrap().is_empty());
        assert_eq!(
            anon["clusters"][0]["cluster"]["insecure-skip-tls-verify"],
            true
        );
        assert!(
            anon["clusters"][0]["cluster"]
                .get("certificate-authority-data")
                .is_none()
        );
    }
}
