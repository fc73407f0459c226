//! A token issuer for distribution's `auth: token` (ES256 JWTs, counting what it issues) and a
//! registry that uses it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;

use super::http::{HttpServer, Reply};
use super::{Registry, RegistryAuth};

/// A token issuer for distribution's `auth: token`: checks Basic credentials and grants every
/// requested action on `repository` scopes as an ES256 JWT with an `x5c` header. The signature
/// is made by the caller's `sign` (so the crypto crates stay in the tests' dev-dependencies).
pub struct TokenIssuer {
    /// The server.
    pub server: HttpServer,
    /// Token requests answered with a token.
    pub issued: Arc<AtomicU64>,
    /// Token requests refused (bad or missing credentials).
    pub refused: Arc<AtomicU64>,
}

/// Signs a JWT's signing input (ES256: 64 bytes r||s).
pub type Signer = Box<dyn Fn(&[u8]) -> Vec<u8> + Send + Sync>;

/// What the issuer signs with and grants.
pub struct IssuerConfig {
    /// `iss`.
    pub issuer: String,
    /// `aud` (the registry's `service`).
    pub service: String,
    /// The one user and password accepted.
    pub user: String,
    /// Password.
    pub password: String,
    /// The JWT's lifetime (`exp - iat`), seconds; negative for tokens that expired already
    /// (distribution accepts 60 s of clock skew past `exp`).
    pub lifetime: i64,
    /// The `expires_in` announced to the client (may differ from `lifetime` to test a registry
    /// that refuses a token the client still believes valid).
    pub expires_in: u64,
    /// DER of the signing certificate (for `x5c`).
    pub cert_der: Vec<u8>,
    /// ES256 signature (64 bytes r||s) of the signing input.
    pub sign: Signer,
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

impl TokenIssuer {
    /// Start the issuer on a free port; its realm is `<url>/token`.
    pub fn start(cfg: IssuerConfig) -> TokenIssuer {
        let issued = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let (iss, rf) = (issued.clone(), refused.clone());
        let jti = AtomicU64::new(0);
        let server = HttpServer::start(move |req| {
            let expect = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", cfg.user, cfg.password))
            );
            if req.path() != "/token" {
                return Reply::new(404, &[], "not found");
            }
            if req.header("authorization") != Some(expect.as_str()) {
                rf.fetch_add(1, Ordering::SeqCst);
                return Reply::new(
                    401,
                    &[("Content-Type", "application/json")],
                    r#"{"details":"bad credentials"}"#,
                );
            }
            let q = req.query();
            let mut access = Vec::new();
            for (k, v) in &q {
                if k != "scope" {
                    continue;
                }
                for s in v.split(' ') {
                    let mut it = s.splitn(2, ':');
                    let (Some(ty), Some(rest)) = (it.next(), it.next()) else {
                        continue;
                    };
                    let Some((name, actions)) = rest.rsplit_once(':') else {
                        continue;
                    };
                    access.push(serde_json::json!({
                        "type": ty, "name": name, "actions": actions.split(',').collect::<Vec<_>>()
                    }));
                }
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock")
                .as_secs();
            let header = serde_json::json!({
                "typ": "JWT", "alg": "ES256",
                "x5c": [base64::engine::general_purpose::STANDARD.encode(&cfg.cert_der)],
            });
            let claims = serde_json::json!({
                "iss": cfg.issuer, "sub": cfg.user, "aud": cfg.service,
                "exp": now.saturating_add_signed(cfg.lifetime), "nbf": now.saturating_sub(1), "iat": now,
                "jti": format!("t{}", jti.fetch_add(1, Ordering::SeqCst)),
                "access": access,
            });
            let input = format!(
                "{}.{}",
                b64url(header.to_string().as_bytes()),
                b64url(claims.to_string().as_bytes())
            );
            let sig = (cfg.sign)(input.as_bytes());
            let token = format!("{input}.{}", b64url(&sig));
            iss.fetch_add(1, Ordering::SeqCst);
            let body = serde_json::json!({"token": token, "expires_in": cfg.expires_in});
            Reply::new(
                200,
                &[("Content-Type", "application/json")],
                body.to_string(),
            )
        });
        TokenIssuer {
            server,
            issued,
            refused,
        }
    }

    /// The realm URL.
    pub fn realm(&self) -> String {
        format!("{}/token", self.server.url())
    }
}

/// A registry with `auth: token` and its own token issuer (a fresh self-signed ES256 key in
/// the registry's `rootcertbundle`), accepting `user`/`password`; tokens live `lifetime` s
/// while the issuer announces `expires_in` s.
pub struct TokenRegistry {
    /// The issuer (counts tokens issued and refused).
    pub issuer: TokenIssuer,
    /// The registry.
    pub registry: Registry,
}

impl TokenRegistry {
    /// Start both, the registry's files in `dir`.
    pub fn start(
        dir: &Path,
        user: &str,
        password: &str,
        lifetime: i64,
        expires_in: u64,
    ) -> TokenRegistry {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = rcgen::CertificateParams::new(vec!["lazyblk-test-issuer".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("self-signed certificate");
        std::fs::create_dir_all(dir).expect("mkdir");
        let bundle = dir.join("root.pem");
        std::fs::write(&bundle, cert.pem()).expect("write root.pem");
        let rng = ring::rand::SystemRandom::new();
        let kp = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &rng,
        )
        .expect("signing key");
        let issuer = TokenIssuer::start(IssuerConfig {
            issuer: "lazyblk-test-issuer".into(),
            service: "lazyblk-test-registry".into(),
            user: user.into(),
            password: password.into(),
            lifetime,
            expires_in,
            cert_der: cert.der().to_vec(),
            sign: Box::new(move |m| kp.sign(&rng, m).expect("sign").as_ref().to_vec()),
        });
        let registry = Registry::start(
            dir,
            &RegistryAuth::Token {
                realm: issuer.realm(),
                service: "lazyblk-test-registry".into(),
                issuer: "lazyblk-test-issuer".into(),
                rootcertbundle: bundle,
            },
        );
        TokenRegistry { issuer, registry }
    }
}
